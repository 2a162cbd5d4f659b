"""The training commands end to end from the CLI, on a folder saved by diffusers itself, and bad input."""

import json
import shutil

import pytest
import torch

from llcm.cli import main
from llcm.latents import LatentSet
from llcm.models import load_components, model_hash
from train_worker import micro_components

FAST = ["--steps", "2", "--batch", "4", "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny Stable Diffusion folder written by diffusers' own save_pretrained."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    c = micro_components()
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                   scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                           beta_end=0.012),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("sd") / "sd-tiny"
    pipe.save_pretrained(folder)
    return folder, model_hash(c.vae)


@pytest.fixture(scope="module")
def latents(sd_folder, tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    out = tmp_path_factory.mktemp("lat")
    LatentSet(torch.randn(16, 4, 8, 8, generator=g), torch.arange(16) % 2, ["axial brain MRI", "chest X-ray"],
              {"vae_hash": sd_folder[1]}).save(out)
    return out


def test_teacher_distill_finetune_from_a_diffusers_folder(sd_folder, latents, tmp_path, capsys):
    sd, _ = sd_folder
    assert main(["train", "teacher", "--base", str(sd), "--latents", str(latents), "--out", str(tmp_path / "t"),
                 "--quiet", *FAST]) == 0
    assert "teacher:" not in capsys.readouterr().err  # --quiet: no progress bar
    assert (tmp_path / "t" / "model" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert main(["distill", "--teacher", str(sd), "--latents", str(latents), "--out", str(tmp_path / "d"),
                 "--k", "100", "--solver", "midpoint", *FAST]) == 0
    meta = json.loads((tmp_path / "d" / "model" / "llcm.json").read_text())
    assert meta["solver"] == "midpoint" and meta["k"] == 100
    assert main(["finetune", "--model", str(tmp_path / "d" / "model"), "--latents", str(latents),
                 "--out", str(tmp_path / "f"), *FAST]) == 0
    assert main(["generate", "axial brain MRI", "--model", str(tmp_path / "f" / "model"), "--steps", "2",
                 "--out", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "000_seed0.png").exists()
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["train"]["max_steps"] == 2 and config["command"] == "distill"
    # --dry-run plans the teacher and LCF runs too (with checkpointing), and writes nothing
    capsys.readouterr()
    for argv, networks in ((["train", "teacher", "--base", str(sd)], ["unet", "text encoder", "vae"]),
                           (["finetune", "--model", str(tmp_path / "d" / "model")], None)):
        assert main([*argv, "--latents", str(latents), "--out", str(tmp_path / "dry"), "--dry-run",
                     "--gradient-checkpointing", *FAST]) == 0
        out = capsys.readouterr().out
        plan = json.loads(next(line for line in out.splitlines() if line.startswith('{"plan"')))["plan"]
        assert plan["gradient_checkpointing"] and plan["memory"]["activations"] > 0 and "memory per process" in out
        assert networks is None or [r["name"] for r in plan["networks"]] == networks
        assert not (tmp_path / "dry").exists()

    # --student: carry the distilled student over to the fine-tuned teacher; it starts from the student's
    # weights (a 1e-12 learning rate keeps them), not from the teacher's plus a zero w-embedding
    assert main(["distill", "--teacher", str(tmp_path / "t" / "model"), "--latents", str(latents),
                 "--student", str(tmp_path / "d" / "model"), "--out", str(tmp_path / "d2"), "--k", "100",
                 "--steps", "1", "--batch", "2", "--lr", "1e-12", "--quiet"]) == 0
    before = load_components(tmp_path / "d" / "model").unet.state_dict()
    after = load_components(tmp_path / "d2" / "model").unet.state_dict()
    assert before.keys() == after.keys() and all(torch.allclose(before[k], after[k], atol=1e-9) for k in before)
    assert after["time_embedding.cond_proj.weight"].abs().sum() > 0  # trained, not the fresh zero init


def test_dry_run_writes_nothing(sd_folder, latents, tmp_path, capsys):
    assert main(["distill", "--teacher", str(sd_folder[0]), "--latents", str(latents), "--out", str(tmp_path / "x"),
                 "--dry-run", "--batch", "8", "--grad-accum", "2", "--gradient-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert '"max_steps"' in out and '"gradient_checkpointing": true' in out and not (tmp_path / "x").exists()
    # the plan: parameters per network, memory per process, images per step (also as one JSON line)
    assert "memory per process" in out and "micro-batches of 4" in out
    plan = json.loads(next(line for line in out.splitlines() if line.startswith('{"plan"')))["plan"]
    assert [r["name"] for r in plan["networks"]] == ["student", "teacher", "target", "text encoder", "vae"]
    assert plan["gradient_checkpointing"] and plan["images_per_step"]["micro_batch"] == 4
    assert plan["memory"]["optimizer"] == 2 * plan["memory"]["gradients"] > 0 and plan["memory"]["activations"] > 0


def _bad_cases(sd, latents, tmp_path):
    wrong = tmp_path / "wrong"
    LatentSet(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), ["x"], {}).save(wrong)
    no_text = tmp_path / "no-text"
    shutil.copytree(sd, no_text)
    shutil.rmtree(no_text / "text_encoder")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = str(tmp_path / "out")
    return {
        "missing dataset": ["distill", "--teacher", str(sd), "--latents", str(tmp_path / "nope"), "--out", out],
        "wrong shape": ["distill", "--teacher", str(sd), "--latents", str(wrong), "--out", out],
        "no text encoder": ["distill", "--teacher", str(no_text), "--latents", str(latents), "--out", out],
        "k too large": ["distill", "--teacher", str(sd), "--latents", str(latents), "--out", out, "--k", "5000"],
        "w_min > w_max": ["distill", "--teacher", str(sd), "--latents", str(latents), "--out", out,
                          "--w-min", "9", "--w-max", "3"],
        "unwritable out": ["distill", "--teacher", str(sd), "--latents", str(latents),
                           "--out", str(blocker / "run"), *FAST],
        "student without w-embedding": ["distill", "--teacher", str(sd), "--latents", str(latents), "--out", out,
                                        "--student", str(sd)],
        "teacher missing latents": ["train", "teacher", "--base", str(sd), "--latents", str(tmp_path / "nope"),
                                    "--out", out],
    }


def test_bad_input_gives_one_clear_line_and_writes_nothing(sd_folder, latents, tmp_path, capsys):
    for name, argv in _bad_cases(sd_folder[0], latents, tmp_path).items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ": error: " in err[0], (name, err)
        assert "Traceback" not in err[0]
        assert not (tmp_path / "out").exists(), name
