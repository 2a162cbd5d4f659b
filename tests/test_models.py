"""Tests for llcm.models: offline CLIP tokenizer, presets, tiny components, loading, student UNet."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch

from llcm import models
from llcm.errors import UserError


def _refuse_network(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("llcm tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def tiny() -> models.Components:
    return models.build_tiny_components(models.load_preset("tiny-cpu"), seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return models.build_clip_tokenizer()


# --- tokenizer ----------------------------------------------------------------------------------


def test_clip_tokenizer_matches_openai_ids(tokenizer):
    # Ids produced by the real openai/clip-vit-large-patch14 (= SD 1.x) tokenizer.
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert tokenizer.model_max_length == 77
    assert len(tokenizer) == 49408
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 49407
    assert tokenizer.bos_token_id == 49406 and tokenizer.eos_token_id == 49407


def test_clip_tokenizer_pads_and_truncates_like_sd(tokenizer):
    ids = tokenizer(["", "word " * 200], padding="max_length", max_length=77, truncation=True).input_ids
    assert ids[0] == [49406] + [49407] * 76  # the null prompt
    assert len(ids[1]) == 77 and ids[1][0] == 49406 and ids[1][-1] == 49407


def test_clip_tokenizer_cache_dir(tmp_path):
    first = models.build_clip_tokenizer(cache_dir=tmp_path)
    (folder,) = list(tmp_path.iterdir())
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    second = models.build_clip_tokenizer(cache_dir=tmp_path)  # reuses the files
    assert len(list(tmp_path.iterdir())) == 1
    assert first("chest x-ray").input_ids == second("chest x-ray").input_ids


# --- presets ------------------------------------------------------------------------------------


def test_presets(monkeypatch):
    assert {"tiny-cpu", "sd15", "sd21-base"} <= set(models.list_presets())
    tiny_preset = models.load_preset("tiny-cpu")
    assert tiny_preset["prediction_type"] == "epsilon" and tiny_preset["unet"]["time_cond_proj_dim"] is None
    tiny_preset["prediction_type"] = "v_prediction"  # load_preset hands out fresh dicts
    assert models.load_preset("tiny-cpu")["prediction_type"] == "epsilon"
    for name in ("sd15", "sd21-base"):
        preset = models.load_preset(name)
        assert preset["source"] == "folder"
        d = preset["distill"]
        assert (d["learning_rate"], d["ema_decay"], d["skipping_interval_k"]) == (8e-6, 0.95, 20)
        assert (d["w_min"], d["w_max"], d["huber_c"], d["global_batch_size"]) == (5.0, 15.0, 0.001, 1024)
    with pytest.raises(UserError, match="unknown preset"):
        models.load_preset("sd99")
    with pytest.raises(UserError, match="never downloads"):
        models.components_from_preset(models.load_preset("sd15"))
    monkeypatch.setattr(models, "load_components", lambda base: ("loaded", base))
    assert models.components_from_preset(models.load_preset("sd21-base"), base="/m") == ("loaded", "/m")


def test_every_key_of_every_shipped_preset_is_one_the_code_reads(tmp_path):
    from llcm.presets import PRESET_KEYS, SECTION_KEYS, training_defaults

    for name in models.list_presets():
        preset = models.load_preset(name)
        assert set(preset) <= PRESET_KEYS, name
        for section in ("teacher", "distill", "finetune"):
            assert set(preset.get(section, {})) <= set(SECTION_KEYS) | {"_why"}, (name, section)
        assert set(preset.get("tokenizer", {})) <= {"model_max_length"}, name
    # and each section key listed is read: a value set in a preset is the default training_defaults gives
    for i, (key, default) in enumerate(SECTION_KEYS.items()):
        path = tmp_path / f"p{i}.json"
        path.write_text(json.dumps({"name": "p", "source": "configs", "distill": {key: f"set-{key}"}}))
        assert training_defaults(str(path), "distill")[default] == f"set-{key}"


# --- tiny components ----------------------------------------------------------------------------


def test_tiny_components_are_deterministic(tiny):
    rng_before = torch.random.get_rng_state()
    again = models.build_tiny_components(models.load_preset("tiny-cpu"), seed=0)
    assert torch.equal(rng_before, torch.random.get_rng_state())  # global RNG untouched
    for a, b in ((tiny.unet, again.unet), (tiny.vae, again.vae), (tiny.text_encoder, again.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert models.model_hash(tiny) == models.model_hash(again)
    other = models.build_tiny_components(models.load_preset("tiny-cpu"), seed=1)
    assert models.model_hash(other) != models.model_hash(tiny)
    assert len(models.model_hash(tiny)) == 12 and int(models.model_hash(tiny), 16) >= 0


def test_tiny_components_shapes_and_sizes(tiny):
    assert (tiny.vae_scale_factor, tiny.latent_channels, tiny.resolution) == (4, 4, 64)
    assert tiny.prediction_type == "epsilon" and tiny.scaling_factor == tiny.vae.config.scaling_factor
    counts = {k: _count(getattr(tiny, k)) for k in ("unet", "vae", "text_encoder")}
    print("tiny-cpu parameter counts:", counts)
    assert 1_500_000 <= counts["unet"] <= 2_000_000
    assert counts["vae"] < 1_500_000 and counts["text_encoder"] < 4_000_000

    cond = models.encode_prompts(tiny, ["a chest x-ray", ""])
    assert cond.shape == (2, 77, 64) and not cond.requires_grad
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 16, 16, generator=g)
    with torch.no_grad():
        start = time.perf_counter()
        eps = tiny.unet(z, torch.tensor([10, 900]), cond).sample
        unet_s = time.perf_counter() - start
        images = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
        start = time.perf_counter()
        latents = tiny.vae.encode(images).latent_dist.mean
        decoded = tiny.vae.decode(latents).sample
        vae_s = time.perf_counter() - start
    print(f"tiny-cpu forward, batch 2: unet {unet_s * 1e3:.0f} ms, vae encode+decode {vae_s * 1e3:.0f} ms")
    assert eps.shape == z.shape and torch.isfinite(eps).all()
    assert latents.shape == (2, 4, 16, 16) and decoded.shape == images.shape


def test_encode_prompts_null_prompt_and_batching(tiny):
    both = models.encode_prompts(tiny, ["a brain MRI", ""])
    single = models.encode_prompts(tiny, [""])
    torch.testing.assert_close(both[1:], single)
    assert not torch.allclose(both[0], both[1])


# --- student UNet -------------------------------------------------------------------------------


def test_add_guidance_embedding_starts_equal_to_teacher(tiny):
    teacher_hash = models.model_hash(tiny)
    student = models.add_guidance_embedding(tiny.unet, dim=256)
    assert student is not tiny.unet and student.config.time_cond_proj_dim == 256
    assert tiny.unet.config.time_cond_proj_dim is None and models.model_hash(tiny) == teacher_hash
    assert torch.count_nonzero(student.time_embedding.cond_proj.weight) == 0

    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([1, 500, 999])
    cond = torch.randn(3, 77, 64, generator=g)
    w_embedding = 10 * torch.randn(3, 256, generator=g)
    with torch.no_grad():
        expected = tiny.unet(z, t, cond).sample
        got = student(z, t, cond, timestep_cond=w_embedding).sample
    assert torch.equal(expected, got)

    # the new projection is trainable: a loss reaches it
    student.train()
    student(z[:1], t[:1], cond[:1], timestep_cond=w_embedding[:1]).sample.square().mean().backward()
    assert student.time_embedding.cond_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="already"):
        models.add_guidance_embedding(student)


# --- loading folders ----------------------------------------------------------------------------


def test_load_components_from_diffusers_saved_pipeline(tiny, tmp_path, monkeypatch):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction"
    )
    pipe = StableDiffusionPipeline(
        vae=tiny.vae,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        unet=tiny.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path)

    _refuse_network(monkeypatch)  # loading a local folder must not touch the network either
    loaded = models.load_components(tmp_path)
    assert loaded.prediction_type == "v_prediction"
    assert loaded.scaling_factor == tiny.scaling_factor
    assert models.model_hash(loaded) == models.model_hash(tiny) == models.model_hash(tmp_path)
    for a, b in ((tiny.vae, loaded.vae), (tiny.text_encoder, loaded.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert loaded.tokenizer("a photo of a cat").input_ids == tiny.tokenizer("a photo of a cat").input_ids
    assert loaded.tokenizer.model_max_length == 77

    half = models.load_components(tmp_path, dtype=torch.bfloat16)
    assert half.unet.dtype == half.vae.dtype == half.text_encoder.dtype == torch.bfloat16

    # our prompt embeddings are diffusers' prompt_embeds, and "" is its negative/null embedding
    prompts = ["a knee x-ray", "an abdominal CT slice"]
    with torch.no_grad():
        positive, negative = pipe.encode_prompt(prompts, "cpu", 1, True)
    torch.testing.assert_close(models.encode_prompts(loaded, prompts), positive, rtol=0, atol=0)
    torch.testing.assert_close(models.encode_prompts(loaded, ["", ""]), negative, rtol=0, atol=0)


@pytest.fixture
def no_network(monkeypatch):
    _refuse_network(monkeypatch)


@pytest.mark.parametrize("name", ["runwayml/stable-diffusion-v1-5", "stabilityai/stable-diffusion-2-1-base"])
def test_hub_id_is_refused_without_network(no_network, name):
    with pytest.raises(UserError, match="never downloads"):
        models.load_components(name)
    with pytest.raises(UserError, match="never downloads"):
        models.model_hash(name)


def test_bad_local_paths_are_refused(no_network, tmp_path):
    with pytest.raises(UserError, match="not found"):
        models.load_components(tmp_path / "missing")
    (tmp_path / "unet").mkdir()
    with pytest.raises(UserError, match="missing vae/, text_encoder/, tokenizer/"):
        models.load_components(tmp_path)
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    with pytest.raises(UserError, match="is a file"):
        models.load_components(checkpoint)
