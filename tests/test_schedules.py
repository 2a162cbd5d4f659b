"""Schedule <-> diffusers scheduler config: a saved model keeps its noise schedule."""

import math

import pytest
import torch

from llcm.schedules import Schedule


def _cosine(n: int = 1000) -> Schedule:
    """The Glide cosine schedule (betas capped at 0.999): neither scaled_linear nor linear."""
    ab = torch.tensor([math.cos((t / n + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(n + 1)],
                      dtype=torch.float64)
    return Schedule.from_betas((1 - ab[1:] / ab[:-1]).clamp(max=0.999))


SCHEDULES = {
    "scaled_linear": lambda: Schedule.scaled_linear(),
    "linear": lambda: Schedule.from_diffusers_config({"beta_schedule": "linear", "beta_start": 0.0001,
                                                      "beta_end": 0.02}),
    "arbitrary": _cosine,
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_diffusers_config_round_trip_keeps_the_schedule(name):
    from diffusers import DDIMScheduler

    s = SCHEDULES[name]()
    config = s.to_diffusers_config()
    written = "arbitrary" if "trained_betas" in config else config["beta_schedule"]
    assert written == name, config.get("beta_schedule")
    back = Schedule.from_diffusers_config(config)
    assert torch.allclose(back.alphas_cumprod, s.alphas_cumprod, rtol=0, atol=1e-6)
    # diffusers' own scheduler (float32) reads the written config as the same schedule
    theirs = DDIMScheduler(**config).alphas_cumprod.double()
    assert torch.allclose(theirs, s.alphas_cumprod, rtol=0, atol=1e-6)


def test_trained_betas_take_precedence_over_beta_schedule():
    betas = torch.linspace(0.001, 0.05, 100, dtype=torch.float64)
    s = Schedule.from_diffusers_config({"num_train_timesteps": 100, "beta_schedule": "scaled_linear",
                                        "trained_betas": betas.tolist()})
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        Schedule.from_diffusers_config({"num_train_timesteps": 1000, "trained_betas": betas.tolist()})


def test_zero_terminal_snr_is_refused():
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        Schedule.from_diffusers_config({"beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True})
    assert Schedule.from_diffusers_config({"rescale_betas_zero_snr": False}).alphas_cumprod[-1] > 0
    with pytest.raises(ValueError, match="zero-terminal-SNR"):  # alpha 0 at t = N-1 given as betas
        Schedule.from_diffusers_config({"num_train_timesteps": 3, "trained_betas": [0.1, 0.5, 1.0]})
