"""Colour mode of a class (llcm.images) and the pipeline's luminance for grayscale classes."""

import dataclasses

import numpy as np
import pytest
import torch

from llcm.images import GRAY_SHARE, channel_spread, grayscale_classes, luminance_rgb
from llcm.models import add_guidance_embedding
from llcm.pipeline import LLCMConfig, LLCMPipeline
from llcm.schedules import Schedule
from train_worker import micro_components

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_luminance_keeps_gray_and_dtype():
    rng = np.random.default_rng(0)
    gray = np.repeat(rng.integers(0, 256, (2, 5, 5, 1), dtype=np.uint8), 3, -1)
    assert np.array_equal(luminance_rgb(gray), gray)  # a gray image is its own luminance
    colour = rng.random((2, 5, 5, 3)).astype(np.float32)
    y = luminance_rgb(colour)
    assert y.dtype == np.float32 and np.allclose(y[..., 0], y[..., 2])
    assert np.allclose(y[..., 0], colour @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    red = np.zeros((1, 1, 1, 3), np.uint8)
    red[..., 0] = 255
    assert luminance_rgb(red)[0, 0, 0].tolist() == [76, 76, 76]  # as PIL's convert("L")


def test_a_class_is_gray_when_most_of_its_images_are():
    rng = np.random.default_rng(1)
    gray = np.repeat(rng.integers(0, 256, (10, 1, 6, 6), dtype=np.uint8), 3, 1)  # [N, 3, H, W]
    colour = rng.integers(0, 256, (10, 3, 6, 6), dtype=np.uint8)
    s = np.concatenate([channel_spread(gray), channel_spread(colour)])
    assert (s[:10] == 0).all() and (s[10:] > 50).all()
    n_gray = int(np.ceil(GRAY_SHARE * 10))  # a few colour images (Doppler, an overlay) do not make it colour
    mixed = np.concatenate([s[:n_gray], s[10:20 - n_gray]])
    labels = ["gray"] * 10 + ["colour"] * 10 + ["mostly gray"] * 10
    assert grayscale_classes(np.concatenate([s, mixed]), labels) == ["gray", "mostly gray"]
    fewer = np.concatenate([s[:n_gray - 1], s[10:21 - n_gray]])
    assert grayscale_classes(fewer, ["x"] * 10) == []


def test_pipeline_draws_a_grayscale_class_in_gray_unless_asked_to_keep_colour():
    c = micro_components(0)
    unet = add_guidance_embedding(c.unet)
    cfg = LLCMConfig(k=100, w_min=1.0, w_max=3.0, w_default=2.0, classes=["gray one", "colour one"],
                     grayscale=["gray one"])
    pipe = LLCMPipeline(dataclasses.replace(c, unet=unet), cfg, Schedule.scaled_linear())
    prompts = ["gray one", "colour one"]
    raw = pipe(prompts, steps=2, seeds=[3, 4], keep_colour=True).images
    out = pipe(prompts, steps=2, seeds=[3, 4]).images
    assert np.ptp(raw[0], axis=-1).max() > 1e-3  # the random micro model's samples are coloured
    assert np.allclose(out[0], luminance_rgb(raw[0]), atol=1e-6) and np.ptp(out[0], axis=-1).max() < 1e-6
    assert np.array_equal(out[1], raw[1])  # a colour class is untouched
    with torch.no_grad():
        assert LLCMConfig.from_dict({"grayscale": ["a"], "unknown": 1}).grayscale == ["a"]
