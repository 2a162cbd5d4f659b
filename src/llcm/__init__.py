"""llcm: Leapfrog Latent Consistency Models for medical image generation."""

__version__ = "0.1.0"
