"""Hostile input to the training commands (issue 18, second round): a run never replaces a finished run or
writes into its inputs, latent caches are checked when read and written, resume survives damaged
checkpoints, and a consistency model is not taken for a teacher. Micro models, one thread, 2-step runs."""

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llcm.cli import build_parser, main
from llcm.errors import UserError
from llcm.latents import LatentSet
from llcm.pipeline import LLCMConfig, save_model_folder
from llcm.schedules import Schedule
from llcm.training import TrainConfig, train
from llcm.vae import load_vae, vae_hash
from cli_checks import one_error_line
from test_lcf import NEW, llcm_folder
from train_worker import make_task, micro_components

FAST = ["--steps", "2", "--batch", "4", "--quiet", "--checkpoint-every", "1", "--replay", "0"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def file_hashes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return llcm_folder(tmp_path_factory.mktemp("base") / "llcm")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher") / "teacher"
    return save_model_folder(micro_components(0), Schedule.scaled_linear(), LLCMConfig(), folder,
                             pipeline_class="StableDiffusionPipeline")


@pytest.fixture(scope="module")
def latents(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("lat") / "lat"
    LatentSet(torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 2, list(NEW),
              {"vae_hash": vae_hash(load_vae(base))}).save(out)
    return out


@pytest.fixture(scope="module")
def finished(base, latents, tmp_path_factory):
    """A finished 2-step finetune run and the hashes of its files."""
    out = tmp_path_factory.mktemp("runs") / "done"
    assert main(["finetune", "--model", str(base), "--latents", str(latents), "--out", str(out), *FAST]) == 0
    return out


def finetune(base, latents, out, *extra):
    return main(["finetune", "--model", str(base), "--latents", str(latents), "--out", str(out), *FAST, *extra])


# ------------------------------------------------------------------------- 1. the run folder

def test_training_again_into_a_finished_run_is_refused_and_keeps_it(base, latents, finished, capsys):
    before = file_hashes(finished)
    assert finetune(base, latents, finished) == 2
    line = one_error_line(capsys)
    assert "--resume" in line and "--overwrite" in line
    assert file_hashes(finished) == before


def test_overwrite_replaces_a_finished_run(base, latents, finished, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(finished, out)
    (out / "checkpoints" / "checkpoint-0000009").mkdir()  # a later checkpoint of the old run must not survive
    assert finetune(base, latents, out, "--overwrite", "--steps", "1") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-0000001"]
    assert json.loads((out / "summary.json").read_text())["step"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # the old run's rows are gone


def test_resume_of_a_finished_run_says_it_is_finished(base, latents, finished, capsys):
    """One line and exit 0 (a script that resumes every stage goes on); nothing is trained or rewritten."""
    before = file_hashes(finished)
    capsys.readouterr()
    assert finetune(base, latents, finished, "--resume") == 0
    said = capsys.readouterr()
    assert said.out.count("\n") == 1 and "is a finished finetune run" in said.out and "nothing to resume" in said.out
    assert file_hashes(finished) == before


@pytest.mark.parametrize("where", ["model itself", "inside the model", "around the latents", "the teacher"])
def test_out_in_or_around_an_input_is_refused_even_with_overwrite(base, teacher, latents, where, capsys):
    before = {p: file_hashes(p) for p in (base, teacher, latents)}
    if where == "the teacher":
        argv = ["distill", "--teacher", str(teacher), "--latents", str(latents), "--out", str(teacher),
                "--steps", "1", "--batch", "2", "--quiet"]
    else:
        out = {"model itself": base, "inside the model": base / "unet" / "run",
               "around the latents": latents.parent}[where]
        argv = ["finetune", "--model", str(base), "--latents", str(latents), "--out", str(out), *FAST]
    assert main([*argv, "--overwrite"]) == 2
    assert "input" in one_error_line(capsys)
    assert {p: file_hashes(p) for p in before} == before
    assert not (base / "unet" / "run").exists()


def test_a_non_empty_folder_that_is_no_run_or_another_commands_run_is_refused(base, latents, finished, teacher,
                                                                           tmp_path, capsys):
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    assert finetune(base, latents, notes) == 2
    assert "no llcm run" in one_error_line(capsys) and sorted(p.name for p in notes.iterdir()) == ["notes.txt"]
    before = file_hashes(finished)
    assert main(["distill", "--teacher", str(teacher), "--latents", str(latents), "--out", str(finished),
                 "--resume", "--steps", "2", "--batch", "2", "--quiet"]) == 2
    assert "finetune run, not distill" in one_error_line(capsys) and file_hashes(finished) == before


@pytest.mark.parametrize("command", [["train", "vae", "--data", "d"], ["train", "teacher", "--latents", "l"],
                                     ["train", "dreambooth", "--teacher", "t", "--latents", "l", "--class", "all"],
                                     ["distill", "--teacher", "t", "--latents", "l"],
                                     ["finetune", "--model", "m", "--latents", "l"]])
def test_every_training_command_takes_overwrite(command):
    assert build_parser().parse_args([*command, "--out", "o", "--overwrite"]).overwrite is True


# ------------------------------------------------------------------------- 2. latent caches

def write_raw_cache(folder: Path, latents, index, prompts=("a", "b"), **meta) -> Path:
    """A cache written without LatentSet.save (as another program, or an older llcm, would)."""
    folder.mkdir(parents=True)
    save_file({"latents": latents, "prompt_index": index}, str(folder / "latents.safetensors"))
    record = {"prompts": list(prompts), "count": int(latents.shape[0]), "shape": list(latents.shape[1:]), **meta}
    (folder / "latents.json").write_text(json.dumps(record))
    return folder


def good():
    return torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 0, 1])


BAD_CACHES = {
    "nan": lambda: (good()[0].index_put_((torch.tensor([1]),), torch.tensor(math.nan)), good()[1]),
    "inf": lambda: (good()[0].index_put_((torch.tensor([2]),), torch.tensor(math.inf)), good()[1]),
    "integer latents": lambda: (torch.zeros(4, 4, 8, 8, dtype=torch.int32), good()[1]),
    "3-d latents": lambda: (torch.randn(4, 8, 8), good()[1]),
    "negative index": lambda: (good()[0], torch.tensor([0, 1, -1, 0])),
    "index past the prompts": lambda: (good()[0], torch.tensor([0, 1, 2, 0])),
    "float index": lambda: (good()[0], torch.tensor([0.0, 1.0, 0.0, 1.0])),
    "index length": lambda: (good()[0], torch.tensor([0, 1, 0])),
}


@pytest.mark.parametrize("case", sorted(BAD_CACHES))
def test_a_cache_with_invalid_latents_is_refused_on_load(case, tmp_path):
    lat, idx = BAD_CACHES[case]()
    folder = write_raw_cache(tmp_path / "lat", lat, idx)
    with pytest.raises(UserError) as err:
        LatentSet.load(folder)
    message = str(err.value)
    assert "latents.safetensors" in message and "llcm encode --overwrite" in message and "\n" not in message


def test_a_cache_whose_json_disagrees_with_its_latents_is_refused(tmp_path):
    folder = write_raw_cache(tmp_path / "lat", *good(), count=5)
    with pytest.raises(UserError, match="records 5"):
        LatentSet.load(folder)


def test_nan_latents_never_reach_a_model(base, tmp_path, capsys):
    lat = write_raw_cache(tmp_path / "lat", good()[0].index_put_((torch.tensor([0]),), torch.tensor(math.nan)),
                          good()[1], NEW, vae_hash=vae_hash(load_vae(base)))
    assert finetune(base, lat, tmp_path / "run") == 2
    assert "NaN" in one_error_line(capsys) and not (tmp_path / "run").exists()


def test_invalid_latents_are_never_written(tmp_path):
    with pytest.raises(UserError, match="NaN"):
        LatentSet(torch.full((2, 4, 8, 8), math.nan), torch.zeros(2, dtype=torch.long), ["a"])
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        LatentSet(torch.zeros(2, 4, 8, 8), torch.tensor([0, -1]), ["a"])
    made = LatentSet(torch.zeros(2, 4, 8, 8), torch.zeros(2, dtype=torch.long), ["a"])
    made.latents[0, 0, 0, 0] = math.inf  # changed after it was made
    with pytest.raises(UserError, match="refusing to write"):
        made.save(tmp_path / "lat")
    assert not (tmp_path / "lat").exists()


@pytest.fixture(scope="module")
def encoded(base, tmp_path_factory):
    from test_evaluate import make_dataset

    root = tmp_path_factory.mktemp("enc")
    data = make_dataset(root / "data", n_train=2, n_test=1)
    out = root / "lat"
    assert main(["encode", "--data", str(data), "--model", str(base), "--out", str(out), "--quiet"]) == 0
    return data, out


@pytest.mark.parametrize("damage", ["cut in half", "zeroed", "one value changed"])
def test_a_damaged_cache_is_named_and_overwrite_rebuilds_it(base, encoded, damage, tmp_path, capsys):
    data, first = encoded
    out = tmp_path / "lat"
    shutil.copytree(first, out)
    f = out / "latents-00000.safetensors"  # the cache's one shard
    raw = bytearray(f.read_bytes())
    if damage == "cut in half":
        raw = raw[:len(raw) // 2]
    elif damage == "zeroed":
        raw = bytearray(len(raw))
    else:
        raw[-1] ^= 0x01  # still a valid file, with other latents than the recorded ones
    f.write_bytes(bytes(raw))
    argv = ["encode", "--data", str(data), "--model", str(base), "--out", str(out), "--quiet"]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert f.name in line and "--overwrite" in line
    assert main([*argv, "--overwrite"]) == 0
    assert torch.equal(LatentSet.load(out).latents.to_tensor(), LatentSet.load(first).latents.to_tensor())


# ------------------------------------------------------------------------- 3. resume

def micro_run(out: Path, steps: int, resume: bool = False) -> dict:
    cfg = TrainConfig(out=str(out), max_steps=steps, batch_size=4, lr=1e-3, checkpoint_every=1, progress=False,
                      keep_checkpoints=10)
    return train(make_task("teacher"), cfg, resume=resume)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    out = tmp_path_factory.mktemp("unbroken") / "run"
    micro_run(out, 3)
    return out


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / "checkpoint-0000003" / "trainable.safetensors"))


@pytest.mark.parametrize("damage", ["cut trainable", "no state.json"])
def test_resume_passes_over_a_damaged_checkpoint_and_says_so(unbroken, damage, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(unbroken, out)
    for name in ("model", "summary.json", "checkpoints/checkpoint-0000003"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    ck = out / "checkpoints" / "checkpoint-0000002"
    if damage == "cut trainable":
        f = ck / "trainable.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
    else:
        (ck / "state.json").unlink()
    capsys.readouterr()
    summary = micro_run(out, 3, resume=True)
    said = capsys.readouterr().out
    assert "checkpoint-0000002" in said and "resuming from checkpoint-0000001" in said
    assert summary["status"] == "finished" and summary["step"] == 3
    a, b = weights(unbroken), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same run as the unbroken one, from step 1


def test_resume_with_no_intact_checkpoint_starts_again_and_says_so(unbroken, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(unbroken, out)
    shutil.rmtree(out / "model")
    (out / "summary.json").unlink()
    for ck in (out / "checkpoints").iterdir():
        (ck / "state.json").unlink()
    capsys.readouterr()
    summary = micro_run(out, 3, resume=True)
    assert "no usable checkpoint" in capsys.readouterr().out and summary["step"] == 3
    a, b = weights(unbroken), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("numbers", [["--steps", "-5"], ["--steps", str(10**9), "--time-limit", "0.002"],
                                     ["--checkpoint-every", "0"], ["--lr", "nan"], ["--warmup", "-1"]])
def test_resume_with_absurd_loop_numbers_is_refused_with_one_line(base, latents, finished, numbers, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "model")  # an unfinished run: resumable
    before = file_hashes(out)
    assert finetune(base, latents, out, "--resume", *numbers) == 2
    assert "must be" in one_error_line(capsys)
    assert file_hashes(out) == before


def test_a_run_resumed_at_its_last_step_saves_its_model_without_a_nan_loss(base, latents, finished, tmp_path,
                                                                            capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "model")  # stopped after the last checkpoint, before the model was saved
    capsys.readouterr()
    assert finetune(base, latents, out, "--resume") == 0
    said = capsys.readouterr().out
    assert "finished at step 2" in said and "nan" not in said.lower()
    assert (out / "model" / "llcm.json").is_file()
    assert "NaN" not in (out / "summary.json").read_text()


def test_resume_past_the_requested_steps_is_refused(base, latents, finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "model")
    before = file_hashes(out)
    assert finetune(base, latents, out, "--resume", "--steps", "1") == 2
    assert "past --steps 1" in one_error_line(capsys) and file_hashes(out) == before


# ------------------------------------------------------------------------- 4. a student is not a teacher

def test_distill_refuses_a_consistency_model_as_teacher(base, latents, tmp_path, capsys):
    assert main(["distill", "--teacher", str(base), "--latents", str(latents), "--out", str(tmp_path / "d"),
                 "--steps", "1", "--batch", "2", "--quiet"]) == 2
    assert "not a diffusion teacher" in one_error_line(capsys) and not (tmp_path / "d").exists()
