import numpy as np
import pytest
import torch

from llcm.consistency import ConsistencyModel, boundary_scalings, guidance_embedding
from llcm.sampling import (consistency_timesteps, draw_noise, initial_latents, make_generators, sample_consistency,
                           teacher_timesteps)
from llcm.schedules import Schedule

SCHED = Schedule.scaled_linear()


def test_boundary_condition_values():
    c_skip, c_out = boundary_scalings(torch.tensor([0.0, 1.0, 999.0]))
    assert c_skip[0] == 1 and c_out[0] == 0
    assert abs(float(c_skip[1]) - 0.25 / (100 + 0.25)) < 1e-12
    assert abs(float(c_out[2]) - 9990 / (9990**2 + 0.25) ** 0.5) < 1e-12


def test_guidance_embedding_matches_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 1.5, 7.0, 14.25])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    assert torch.allclose(guidance_embedding(w, 256), ref, atol=1e-6)


def test_f_at_t0_is_identity(tiny_student):
    f = ConsistencyModel(tiny_student.unet, SCHED)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(2, 77, tiny_student.text_encoder.config.hidden_size)
    with torch.no_grad():
        out = f(z, torch.zeros(2, dtype=torch.long), emb, 7.0)
        assert torch.equal(out, z)
        # away from 0 the output is essentially the x0 prediction
        out999 = f(z, torch.full((2,), 999), emb, 7.0)
        x0 = f.predict_x0(z, torch.full((2,), 999), emb, 7.0)
    assert not torch.allclose(out999, z) and torch.allclose(out999, x0, atol=1e-3)


def test_one_step_sampling_is_one_f_call(tiny_student):
    f = ConsistencyModel(tiny_student.unet, SCHED)
    emb = torch.randn(3, 77, tiny_student.text_encoder.config.hidden_size)
    calls = []
    f.register_forward_hook(lambda m, i, o: calls.append(1))
    out = sample_consistency(f, emb, 6.0, make_generators([5, 6, 7]), (4, 16, 16), [999])
    assert len(calls) == 1
    z = torch.cat([torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(s)) for s in (5, 6, 7)])
    with torch.no_grad():
        assert torch.equal(out, f(z, torch.full((3,), 999), emb, 6.0))


def test_per_image_seeds_make_images_independent_of_batch(tiny_student):
    f = ConsistencyModel(tiny_student.unet, SCHED)
    emb = torch.randn(3, 77, tiny_student.text_encoder.config.hidden_size)
    ts = consistency_timesteps(4)
    batch = sample_consistency(f, emb, 6.0, make_generators([10, 11, 12]), (4, 16, 16), ts)
    alone = sample_consistency(f, emb[1:2], 6.0, make_generators([11]), (4, 16, 16), ts)
    assert torch.allclose(batch[1:2], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps,expected", [
    (1, [999]), (2, [999, 499]), (4, [999, 759, 499, 259]),
    (8, [999, 879, 759, 639, 499, 379, 259, 139]),
])
def test_timestep_rule_matches_documented_table_and_diffusers(steps, expected):
    from diffusers import LCMScheduler

    assert consistency_timesteps(steps) == expected
    sch = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sch.set_timesteps(steps)
    assert sch.timesteps.tolist() == expected


def test_timestep_rules_reject_bad_counts():
    with pytest.raises(ValueError):
        consistency_timesteps(0)
    with pytest.raises(ValueError):
        consistency_timesteps(51)
    assert teacher_timesteps(50)[:2] == [999, 979] and teacher_timesteps(50)[-1] == 19


def test_initial_noise_channel_means_equal_the_trained_offset():
    """Every start's per-channel spatial mean is exactly sqrt(alpha_bar_T) mu: the draw's own channel means
    (std 1/sqrt(h w)) are removed, since they chose the colour of the default model's failure seeds."""
    sched, shape, mu, seeds = Schedule.scaled_linear(), (3, 4, 4), [2.0, -1.0, 0.5], list(range(16))
    plain = draw_noise(make_generators(seeds), shape)
    assert torch.equal(initial_latents(make_generators(seeds), shape, sched, 999), plain)  # no mu: diffusers' draw
    start = initial_latents(make_generators(seeds), shape, sched, 999, mu)
    offset = float(sched.alphas_cumprod[999]) ** 0.5 * torch.tensor([mu])  # ~0.07 mu for SD's schedule
    assert torch.allclose(start.mean((2, 3)), offset.expand(len(seeds), 3), atol=1e-6)
    # the rest of the one draw per generator is kept, so a seed's start does not depend on its batch
    assert torch.allclose(start - start.mean((2, 3), keepdim=True), plain - plain.mean((2, 3), keepdim=True),
                          atol=1e-6)
    assert torch.equal(initial_latents(make_generators([seeds[5]]), shape, sched, 999, mu)[0], start[5])
    with pytest.raises(ValueError):
        initial_latents(make_generators([5]), shape, sched, 999, [1.0, 2.0])


def test_pipeline_starts_from_the_recorded_latent_mean(tiny_student):
    from llcm.models import encode_prompts
    from llcm.pipeline import LLCMConfig, LLCMPipeline, decode_latents

    mu = [3.0, 0.0, 0.0, -3.0]
    plain = LLCMPipeline(tiny_student, LLCMConfig())
    shifted = LLCMPipeline(tiny_student, LLCMConfig(latent_mean=mu))
    a, b = plain(["x"], steps=1, seeds=[0]).images, shifted(["x"], steps=1, seeds=[0]).images
    assert np.abs(a - b).max() > 1e-3
    # the same start passed explicitly gives the same images: the start is the only difference
    ts = consistency_timesteps(1, 1000, 20)
    z_start = initial_latents(make_generators([0]), (4, 16, 16), shifted.schedule, ts[0], mu)
    with torch.no_grad():
        z0 = sample_consistency(plain.model, encode_prompts(tiny_student, ["x"]), plain.config.w_default,
                                make_generators([0]), (4, 16, 16), ts, latents=z_start)
        assert np.abs(decode_latents(tiny_student, z0) - b).max() < 1e-5
