"""LCF that learns and keeps: adapter runs (a small folder beside an untouched base), `--model default`
everywhere, and replay of the base's classes. Micro models (tests/train_worker.py), one thread."""

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llcm.adapter import adapter_record
from llcm.cli import main
from llcm.errors import UserError
from llcm.latents import LatentSet
from llcm.models import add_guidance_embedding, model_hash
from llcm.pipeline import LLCMConfig, save_model_folder
from llcm.schedules import Schedule
from llcm.vae import load_vae, vae_hash
from cli_checks import one_error_line
from train_worker import micro_components

FAST = ["--steps", "2", "--batch", "4", "--quiet", "--checkpoint-every", "1", "--replay", "0"]  # plain LCF
NEW = ["top bar", "bottom bar"]
OLD = ["left blob", "right blob"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one thread on a shared 2-core machine


def llcm_folder(path: Path, seed: int = 0) -> Path:
    """A micro LLCM (w-embedding with non-zero weights) saved as a model folder that knows OLD."""
    c = micro_components(seed)
    unet = add_guidance_embedding(c.unet)
    with torch.no_grad():
        proj = unet.time_embedding.cond_proj.weight
        proj.copy_(torch.randn(proj.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    cfg = LLCMConfig(k=100, w_min=1.0, w_max=3.0, w_default=2.0, classes=list(OLD))
    return save_model_folder(dataclasses.replace(c, unet=unet), Schedule.scaled_linear(), cfg, path)


def file_hashes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def pixels(folder: Path) -> np.ndarray:
    return np.asarray(Image.open(folder / "000_seed0.png"), dtype=np.int16)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return llcm_folder(tmp_path_factory.mktemp("base") / "llcm")


@pytest.fixture(scope="module")
def latents(base, tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    out = tmp_path_factory.mktemp("lat")
    LatentSet(torch.randn(8, 4, 8, 8, generator=g) + 1.0, torch.arange(8) % 2, list(NEW),
              {"vae_hash": vae_hash(load_vae(base))}).save(out)
    return out


@pytest.fixture(scope="module")
def adapter_run(base, latents, tmp_path_factory):
    """One `finetune --lora-rank 4` run, with the base's file hashes before and after."""
    before = file_hashes(base)
    out = tmp_path_factory.mktemp("runs") / "lcf"
    assert main(["finetune", "--model", str(base), "--latents", str(latents), "--out", str(out),
                 "--lora-rank", "4", *FAST]) == 0
    return {"model": out / "model", "before": before, "after_train": file_hashes(base)}


def test_adapter_is_small_keeps_the_base_and_equals_the_merged_model(base, latents, adapter_run, tmp_path):
    model = adapter_run["model"]
    files = file_hashes(model)
    assert set(files) == {"adapter.safetensors", "llcm.json", "scheduler/scheduler_config.json"}
    size = (model / "adapter.safetensors").stat().st_size
    assert 1_000 < size < 2_000_000
    tensors = load_file(str(model / "adapter.safetensors"))
    full = [k for k in tensors if "lora_" not in k]
    assert full == ["time_embedding.cond_proj.weight"]  # the w-embedding trains in full; no UNet weights
    meta = json.loads((model / "llcm.json").read_text())
    rec = meta["adapter"]
    assert rec["base"] == os.path.relpath(base.resolve(), model.resolve())  # moves with its base
    assert adapter_record(model)["base"] == str(base.resolve())
    assert rec["base_hash"] == model_hash(base) and rec["rank"] == 4
    assert meta["classes"] == NEW and meta["k"] == 200 and [meta["w_min"], meta["w_max"]] == [1.0, 3.0]
    assert len(meta["latent_mean"]) == 4
    assert adapter_run["after_train"] == adapter_run["before"]

    # the same run with --merge writes the merged full model: the adapter's images equal its images
    merged = tmp_path / "merged"
    assert main(["finetune", "--model", str(base), "--latents", str(latents), "--out", str(merged),
                 "--lora-rank", "4", "--merge", *FAST]) == 0
    assert (merged / "model" / "unet").is_dir() and not (merged / "model" / "adapter.safetensors").exists()
    gen = ["generate", NEW[0], "--steps", "2"]
    assert main([*gen, "--model", str(base), "--out", str(tmp_path / "g-base")]) == 0
    assert main([*gen, "--adapter", str(model), "--out", str(tmp_path / "g-adapter")]) == 0
    assert main([*gen, "--model", str(base), "--adapter", str(model), "--out", str(tmp_path / "g-both")]) == 0
    assert main([*gen, "--model", str(model), "--out", str(tmp_path / "g-as-model")]) == 0
    assert main([*gen, "--model", str(merged / "model"), "--out", str(tmp_path / "g-merged")]) == 0
    a = pixels(tmp_path / "g-adapter")
    assert np.abs(a - pixels(tmp_path / "g-base")).max() > 0
    for other in ("g-both", "g-as-model", "g-merged"):
        assert np.array_equal(a, pixels(tmp_path / other)), other
    png = Image.open(tmp_path / "g-adapter" / "000_seed0.png")
    assert png.text["llcm:model_hash"] == meta["unet_hash"] == model_hash(merged / "model")
    assert file_hashes(base) == adapter_run["before"]


def test_an_adapter_folder_is_a_model_for_every_command(base, latents, adapter_run, tmp_path):
    from llcm.evaluation.evaluate import ConsistencySampler, EvalConfig, parse_model_spec, plan_runs, run_identity
    from llcm.serve import Limits, load_service

    model = adapter_run["model"]
    meta = json.loads((model / "llcm.json").read_text())
    cfg = EvalConfig(data=str(tmp_path), models=[parse_model_spec(f"lcf={model}")], out=str(tmp_path / "e"),
                     steps=(2,))
    (run,) = plan_runs(cfg)
    assert run.kind == "consistency" and run_identity(run, cfg)["model_hash"] == meta["unet_hash"]
    sampler = ConsistencySampler(run.path, torch.device("cpu"))
    assert sampler.pipe.model_hash == meta["unet_hash"] and sampler.pipe.config.classes == NEW
    for kwargs in ({"model": str(model)}, {"model": None, "adapter": str(model)}):
        service = load_service(out=tmp_path / "serve", limits=Limits(), **kwargs)
        assert service.pipe.model_hash == meta["unet_hash"] and not service.notes

    # a further finetune with --lora-rank chains: its adapter names the first one as its base
    out = tmp_path / "chain"
    assert main(["finetune", "--model", str(model), "--latents", str(latents), "--out", str(out),
                 "--lora-rank", "2", "--steps", "1", "--batch", "2", "--quiet"]) == 0
    rec = adapter_record(out / "model")
    assert rec["base"] == str(model.resolve()) and rec["base_hash"] == meta["unet_hash"]
    assert main(["generate", NEW[0], "--model", str(out / "model"), "--steps", "1", "--out", str(tmp_path / "g")]) == 0
    # several adapters sit beside one base
    second = tmp_path / "second"
    assert main(["finetune", "--model", str(base), "--latents", str(latents), "--out", str(second),
                 "--lora-rank", "2", "--steps", "1", "--batch", "2", "--quiet"]) == 0
    assert main(["generate", NEW[0], "--adapter", str(second / "model"), "--steps", "1",
                 "--out", str(tmp_path / "g2")]) == 0
    assert main(["generate", NEW[0], "--adapter", str(model), "--steps", "1", "--out", str(tmp_path / "g1")]) == 0
    assert not np.array_equal(pixels(tmp_path / "g1"), pixels(tmp_path / "g2"))
    assert file_hashes(base) == adapter_run["before"]


def test_an_adapter_on_another_base_is_refused(base, latents, adapter_run, tmp_path, capsys):
    other = llcm_folder(tmp_path / "other", seed=1)
    out = tmp_path / "g"
    assert main(["generate", NEW[0], "--model", str(other), "--adapter", str(adapter_run["model"]),
                 "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert f"was trained on base {model_hash(base)}, this base" in line and model_hash(other) in line
    assert not out.exists()
    # the recorded base changed since: refused when the adapter folder is used as --model too
    moved = tmp_path / "moved"
    shutil.copytree(adapter_run["model"], moved)
    meta = json.loads((moved / "llcm.json").read_text())
    meta["adapter"]["base"] = str(other)
    (moved / "llcm.json").write_text(json.dumps(meta))
    for argv in (["generate", NEW[0], "--model", str(moved), "--out", str(out)],
                 ["finetune", "--model", str(moved), "--latents", str(latents), "--out", str(out)]):
        assert main(argv) == 2
        assert "was trained on base" in one_error_line(capsys) and not out.exists()
    assert main(["generate", NEW[0], "--adapter", str(base), "--out", str(out)]) == 2
    assert "not an adapter folder" in one_error_line(capsys) and not out.exists()


def test_bad_rank_and_another_vae_are_refused_before_out_exists(base, latents, tmp_path, capsys):
    out = tmp_path / "out"
    for rank in ("-1", "1000"):
        assert main(["finetune", "--model", str(base), "--latents", str(latents), "--out", str(out),
                     "--lora-rank", rank]) == 2
        assert f"LoRA rank {rank} does not fit this UNet: use 1 to 32" in one_error_line(capsys)
        assert not out.exists()
    foreign = tmp_path / "foreign"
    LatentSet(torch.randn(4, 4, 8, 8), torch.zeros(4, dtype=torch.long), ["x"],
              {"vae_hash": "0123456789ab"}).save(foreign)
    for extra in ([], ["--lora-rank", "2"]):
        assert main(["finetune", "--model", str(base), "--latents", str(foreign), "--out", str(out), *extra]) == 2
        assert "made by VAE 0123456789ab" in one_error_line(capsys) and not out.exists()
    assert main(["finetune", "--model", str(base), "--latents", str(latents), "--out", str(out), "--replay", "0.5",
                 "--replay-latents", str(foreign)]) == 2
    assert "made by VAE 0123456789ab" in one_error_line(capsys) and not out.exists()
    assert main(["finetune", "--model", str(base), "--latents", str(latents), "--out", str(out), "--replay", "1"]) == 2
    assert "0 <= F < 1" in one_error_line(capsys) and not out.exists()


def test_model_default_for_encode_finetune_and_evaluate(tmp_path, capsys, monkeypatch):
    import llcm.pipeline
    from llcm.evaluation.evaluate import EvalConfig, parse_model_spec, plan_runs
    from test_vae_encode import make_dataset

    default = llcm.pipeline.default_model_path()
    assert default is not None
    data = make_dataset(tmp_path / "data", per_class=(1, 0), size=64)
    lat = tmp_path / "lat"
    assert main(["encode", "--data", str(data), "--model", "default", "--out", str(lat), "--quiet"]) == 0
    assert LatentSet.load(lat).meta["vae_hash"] == vae_hash(load_vae(default))
    before = file_hashes(default)
    out = tmp_path / "ft"
    assert main(["finetune", "--model", "default", "--latents", str(lat), "--out", str(out), "--lora-rank", "2",
                 "--steps", "1", "--batch", "2", "--quiet"]) == 0
    assert json.loads((out / "model" / "llcm.json").read_text())["adapter"]["base"] == "default"
    assert file_hashes(default) == before
    capsys.readouterr()
    assert main(["encode", "--data", str(data), "--model", str(out / "model"), "--out", str(lat), "--quiet"]) == 0
    assert "nothing to do" in capsys.readouterr().out  # an adapter encodes with its base's VAE
    cfg = EvalConfig(data=str(data), models=[parse_model_spec("d=default")], out=str(tmp_path / "e"), steps=(1,))
    assert plan_runs(cfg)[0].path == str(default.resolve())

    monkeypatch.setattr(llcm.pipeline, "default_model_path", lambda: None)  # an install without one
    capsys.readouterr()
    for argv in (["encode", "--data", str(data), "--model", "default", "--out", str(tmp_path / "x")],
                 ["generate", "x", "--model", "default", "--out", str(tmp_path / "x")],
                 ["finetune", "--model", "default", "--latents", str(lat), "--out", str(tmp_path / "x")]):
        assert main(argv) == 2
        assert "this llcm install has no default model" in one_error_line(capsys)
        assert not (tmp_path / "x").exists()


def test_replay_rows_carry_their_prompts_and_draws_are_deterministic(base, latents):
    from llcm.models import load_components
    from llcm.replay import replay_rows
    from llcm.tasks import FinetuneTask, prompt_table
    from llcm.training import batch_indices, step_generator

    data = LatentSet.load(latents)
    g = torch.Generator().manual_seed(1)
    replay = LatentSet(torch.randn(6, 4, 8, 8, generator=g) - 5.0, torch.arange(6) % 2, list(OLD), {})
    comps = load_components(base)
    plain = FinetuneTask(comps, data, k=100, w_min=1.0, w_max=3.0)
    task = FinetuneTask(load_components(base), data, k=100, w_min=1.0, w_max=3.0, replay=replay,
                        replay_fraction=0.25)
    emb = prompt_table(comps, OLD + NEW)
    for step in range(3):
        idx = batch_indices(len(data), 8, step, 0)
        batch = task.draw(idx, step_generator(0, step))
        again = task.draw(idx, step_generator(0, step))
        assert all(torch.equal(batch[k], again[k]) for k in batch)
        is_replay = batch["z0"].mean((1, 2, 3)) < -3  # replay latents sit near -5, the new ones near +1
        assert int(is_replay.sum()) == replay_rows(8, 0.25) == 2 and torch.equal(batch["replay"], is_replay)
        for row, old in zip(batch["embeds"], is_replay):
            names = OLD if old else NEW
            assert any(torch.equal(row, emb[(OLD + NEW).index(p)]) for p in names)
    # without replay the draws are exactly the plain LCF draws (no extra random numbers)
    none = FinetuneTask(load_components(base), data, k=100, w_min=1.0, w_max=3.0, replay=replay, replay_fraction=0.0)
    idx = batch_indices(len(data), 8, 0, 0)
    a, b = plain.draw(idx, step_generator(0, 0)), none.draw(idx, step_generator(0, 0))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sampled_replay_is_cached_in_out_and_reused_on_resume(base, latents, tmp_path, monkeypatch):
    import llcm.replay

    out = tmp_path / "run"
    argv = ["finetune", "--model", str(base), "--latents", str(latents), "--out", str(out), "--replay", "0.5",
            "--replay-per-class", "2", "--batch", "4", "--quiet", "--checkpoint-every", "1"]
    assert main([*argv, "--steps", "1"]) == 0
    cache = LatentSet.load(out / "replay")
    assert len(cache) == 4 and cache.prompts == OLD and cache.meta["base_hash"] == model_hash(base)
    stamp = file_hashes(out / "replay")
    meta = json.loads((out / "model" / "llcm.json").read_text())
    assert meta["source"]["replay"]["fraction"] == 0.5 and meta["source"]["replay"]["per_class"] == 2
    assert meta["classes"] == NEW + OLD
    assert json.loads((out / "config.json").read_text())["args"]["replay"] == 0.5

    def no_sampling(*a, **k):
        raise AssertionError("the cached replay latents must be reused")

    monkeypatch.setattr(llcm.replay, "sample_replay", no_sampling)
    assert main([*argv, "--steps", "2", "--resume"]) == 0
    assert file_hashes(out / "replay") == stamp
    assert json.loads((out / "summary.json").read_text())["step"] == 2


def test_finetuned_model_lists_the_new_and_the_base_grayscale_classes(tmp_path):
    base = llcm_folder(tmp_path / "base", seed=1)
    cfg = json.loads((base / "llcm.json").read_text())
    (base / "llcm.json").write_text(json.dumps({**cfg, "grayscale": [OLD[1]]}))
    lat = tmp_path / "lat"
    LatentSet(torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.arange(4) % 2, list(NEW),
              {"vae_hash": vae_hash(load_vae(base)), "grayscale": [NEW[0]]}).save(lat)
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(base), "--latents", str(lat), "--out", str(out), *FAST,
                 "--k-start", "1000"]) == 0
    made = json.loads((out / "model" / "llcm.json").read_text())
    assert made["grayscale"] == sorted([NEW[0], OLD[1]]) and made["k"] == 200  # the tiny preset's LCF k


def test_k_curriculum_shrinks_from_k_start_to_k(base, latents):
    from llcm.models import load_components
    from llcm.tasks import FinetuneTask

    def task(**kw):
        return FinetuneTask(load_components(base), LatentSet.load(latents), k=100, w_min=1.0, w_max=3.0,
                            ema_decay=0.0, **kw)

    t = task(k_start=1000, k_ramp=0.5)
    t.max_steps = 100
    ks = []
    for step in (0, 25, 50, 99):
        t.step = step
        ks.append(t.k_now())
    assert ks == [1000, 316, 100, 100]  # geometric over the first half, then k
    t.step = 0
    b = t.draw(torch.arange(4), torch.Generator().manual_seed(0))
    assert (b["t"] == 999).all() and (b["s"] == 0).all()  # one interval of 1000: the target is z0 itself
    assert task().k_now() == 100
    for bad in ({"k_start": 50}, {"k_start": 1001}, {"k_start": 500, "k_ramp": 0.0}):
        with pytest.raises(UserError):
            task(**bad)


def test_replay_rows_are_held_to_the_frozen_base(base, latents):
    """Before any update the student is the base: its replay rows cost exactly 0, the new rows do not; after
    updates on the new data the base copy is still the base."""
    from llcm.models import load_components
    from llcm.tasks import FinetuneTask
    from llcm.training import batch_indices, step_generator

    data = LatentSet.load(latents)
    replay = LatentSet(torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.arange(6) % 2,
                       list(OLD), {})
    task = FinetuneTask(load_components(base), data, k=100, w_min=1.0, w_max=3.0, ema_decay=0.0, replay=replay,
                        replay_fraction=0.5)
    batch = task.draw(batch_indices(len(data), 8, 0, 0), step_generator(0, 0))
    loss = task.loss(task.trainable, batch)
    assert loss.shape == (8,) and (loss[batch["replay"]] == 0).all() and (loss[~batch["replay"]] > 0).all()
    before = {k: v.clone() for k, v in task.base.state_dict().items()}
    opt = torch.optim.SGD([p for p in task.trainable.parameters() if p.requires_grad], lr=0.1)
    loss.mean().backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in task.base.state_dict().items())
    assert task.loss(task.trainable, batch)[batch["replay"]].gt(0).all()  # the student moved, the base did not


def test_replay_of_the_base_classes_is_on_by_default(base, latents, tmp_path):
    from llcm.replay import DEFAULT_FRACTION

    out = tmp_path / "run"
    assert main(["finetune", "--model", str(base), "--latents", str(latents), "--out", str(out), "--steps", "2",
                 "--batch", "4", "--quiet", "--replay-per-class", "2"]) == 0
    made = json.loads((out / "model" / "llcm.json").read_text())
    assert DEFAULT_FRACTION == 0.25 and made["source"]["replay"]["fraction"] == DEFAULT_FRACTION
    assert made["classes"] == NEW + OLD and (out / "replay").is_dir()


def test_cosine_lcf_resumed_from_a_checkpoint_ends_where_an_unbroken_run_does(base, latents, tmp_path):
    """The tiny preset's LCF decays the learning rate to 0 over --steps (cosine); a run resumed from its
    step-2 checkpoint gives the unbroken run's weights bit for bit."""
    args = ["finetune", "--model", str(base), "--latents", str(latents), "--steps", "4", "--batch", "4",
            "--quiet", "--replay", "0", "--checkpoint-every", "2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # b: as if stopped after the checkpoint at step 2
    shutil.rmtree(tmp_path / "b" / "model")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "checkpoint-0000004")
    assert main([*args, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a = load_file(tmp_path / "a" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["train"]["lr_schedule"] == "cosine"
    rates = [json.loads(line)["lr"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rates[-1] == 0.0  # the cosine reaches 0 at the last step


@pytest.mark.parametrize("flag", ["--steps", "--batch", "--lr"])
def test_zero_steps_batch_or_lr_are_refused_not_replaced_by_defaults(base, latents, tmp_path, capsys, flag):
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(base), "--latents", str(latents), "--out", str(out), "--quiet",
                 "--replay", "0", flag, "0"]) == 2
    assert "must be" in capsys.readouterr().err and not out.exists()
