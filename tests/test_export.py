import json

import numpy as np
import pytest
import torch

from llcm.pipeline import LLCMConfig, LLCMPipeline
from llcm.errors import UserError


@pytest.fixture(scope="module")
def pipe(tiny_student):
    return LLCMPipeline(tiny_student, LLCMConfig(classes=["axial brain MRI"]), name="tiny")


def test_export_round_trip_with_diffusers(pipe, tmp_path):
    from diffusers import LatentConsistencyModelPipeline

    prompts, seeds, w = ["axial brain MRI", "chest X-ray with a nodule"], [3, 4], 7.0
    ours = pipe(prompts, steps=4, seeds=seeds, w=w)
    folder = pipe.export(tmp_path / "model")
    assert (folder / "model_index.json").exists() and (folder / "llcm.json").exists()
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pkl"))
    theirs_pipe = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    theirs = theirs_pipe(prompt=prompts, num_inference_steps=4, guidance_scale=w + 1,
                         generator=[torch.Generator().manual_seed(s) for s in seeds],
                         output_type="np", height=64, width=64).images
    assert theirs.shape == ours.images.shape
    assert np.abs(theirs - ours.images).max() <= 1e-4
    # and our loader reads the folder back to the same images
    loaded = LLCMPipeline.from_pretrained(folder)
    again = loaded(prompts, steps=4, seeds=seeds, w=w)
    assert np.abs(again.images - ours.images).max() <= 1e-6
    assert loaded.config.classes == ["axial brain MRI"] and again.model_hash == ours.model_hash


def test_diffusers_matches_with_the_recorded_start(tiny_student, tmp_path):
    """A model with latent_mean: diffusers' pipeline, given llcm's starting latents, draws the same images."""
    from diffusers import LatentConsistencyModelPipeline

    from llcm.sampling import consistency_timesteps, initial_latents, make_generators

    mu, seeds, w = [1.5, -2.0, 0.0, 0.5], [3, 4], 7.0
    pipe = LLCMPipeline(tiny_student, LLCMConfig(latent_mean=mu), name="tiny")
    ours = pipe(["a", "b"], steps=4, seeds=seeds, w=w)
    folder = pipe.export(tmp_path / "model")
    assert LLCMPipeline.from_pretrained(folder).config.latent_mean == mu
    gens = make_generators(seeds)  # drawing the start advances them, as in llcm's own sampler
    start = initial_latents(gens, (4, 16, 16), pipe.schedule, consistency_timesteps(4, 1000, pipe.config.k)[0], mu)
    theirs = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)(
        prompt=["a", "b"], num_inference_steps=4, guidance_scale=w + 1, generator=gens, latents=start,
        output_type="np", height=64, width=64).images
    assert np.abs(theirs - ours.images).max() <= 1e-4


def test_save_refuses_to_overwrite(pipe, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("precious")
    with pytest.raises(UserError):
        pipe.save(tmp_path / "m")
    assert (tmp_path / "m" / "keep.txt").read_text() == "precious"


def test_one_step_has_no_noise_injection_and_steps_differ(pipe):
    one = pipe(["x"], steps=1, seeds=[0]).images
    four = pipe(["x"], steps=4, seeds=[0]).images
    assert one.shape == four.shape and not np.allclose(one, four)


def test_request_validation(pipe):
    with pytest.raises(UserError):
        pipe(["x"], steps=0)
    with pytest.raises(UserError):
        pipe(["x"], steps=51)
    with pytest.raises(UserError):
        pipe(["x"], height=63)
    with pytest.raises(UserError):
        pipe(["x"] * 65)
    with pytest.warns(UserWarning, match="outside the trained range"):
        pipe(["x"], w=40.0)
    pipe([""], steps=1)  # the empty prompt is the unconditional one


def test_export_keeps_the_models_timestep_scaling(tiny_student, tmp_path):
    """The exported LCMScheduler carries the model's own timestep_scaling (it used to be written as 10.0),
    so diffusers draws what llcm draws for a model trained with another value."""
    from diffusers import LatentConsistencyModelPipeline

    ours_pipe = LLCMPipeline(tiny_student, LLCMConfig(timestep_scaling=2.5), name="tiny")
    prompts, seeds, w = ["axial brain MRI"], [3], 7.0
    ours = ours_pipe(prompts, steps=2, seeds=seeds, w=w)
    folder = ours_pipe.export(tmp_path / "model")
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["timestep_scaling"] == 2.5
    theirs = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)(
        prompt=prompts, num_inference_steps=2, guidance_scale=w + 1,
        generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np", height=64, width=64).images
    assert np.abs(theirs - ours.images).max() <= 1e-4
