"""`llcm train vae` and `llcm encode` end to end on a tiny generated imagefolder dataset.

36 train + 12 test 32x32 images of three classes (disk / square / stripes at random positions) and
a micro AutoencoderKL (block_out_channels 8-16-16: factor 4, latents 4x8x8), trained for 30 steps.
Runs single-threaded: on a busy 2-core machine two threads spin-wait and are ~5x slower.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llcm.cli import main
from llcm.latents import LatentSet

CLASSES = {"disk": "a bright disk", "square": "a dark square", "stripes": "vertical stripes"}
SIZE = 32
STEPS = 30


def shape_image(cls: str, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size), 40.0) + rng.normal(0, 4, (size, size))
    cx, cy = rng.integers(size // 4, 3 * size // 4, 2)
    r = rng.integers(size // 8, size // 4)
    if cls == "disk":
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = 220
    elif cls == "square":
        img[max(cy - r, 0):cy + r, max(cx - r, 0):cx + r] = 140
    else:
        img[((xx + cx) // (int(rng.integers(4, 9)) // 2 + 1)) % 2 == 0] = 180
    return np.clip(np.stack([img, img * 0.9, img * 0.8], -1), 0, 255).astype(np.uint8)


def make_dataset(root: Path, per_class=(12, 4), size: int = SIZE, seed: int = 0, odd_size: int | None = None) -> Path:
    """HF imagefolder layout: <root>/<split>/metadata.jsonl + <class>/<i>.png (rows shuffled)."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        if n == 0:
            continue
        rows = []
        for cls, prompt in CLASSES.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                name = f"{cls}/{i:03d}.png"
                s = odd_size if (odd_size and i == n - 1 and cls == "stripes") else size
                Image.fromarray(shape_image(cls, rng, s)).save(root / split / name)
                rows.append({"file_name": name, "text": prompt, "class": cls})
        order = rng.permutation(len(rows))
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(rows[i]) + "\n" for i in order))
    return root


def micro_preset(path: Path) -> Path:
    from llcm.models import load_preset

    p = load_preset("tiny-cpu")
    p["name"] = "micro-vae"
    p["vae"].update(block_out_channels=[8, 16, 16], norm_num_groups=4, sample_size=SIZE,
                    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3)
    path.write_text(json.dumps(p))
    return path


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest's: one torch thread for the module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vae")
    data = make_dataset(tmp / "data")
    preset = micro_preset(tmp / "micro.json")
    run = tmp / "run"
    rc = main(["train", "vae", "--data", str(data), "--out", str(run), "--preset", str(preset),
               "--steps", str(STEPS), "--batch", "8", "--lr", "2e-3", "--log-every", "1", "--quiet"])
    assert rc == 0
    return {"tmp": tmp, "data": data, "preset": preset, "run": run}


def test_train_vae_learns(trained, capsys):
    run = trained["run"]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.6 * first, (first, last)

    report = json.loads((run / "model" / "vae_report.json").read_text())
    assert report["psnr_split"] == "test" and report["psnr_images"] == 12 and report["steps"] == STEPS
    # a VAE must beat predicting the mean image; 30 steps give ~+2.3 dB here
    assert report["psnr_db"] > report["baseline_mean_image_psnr_db"] + 1.0, report
    assert "perceptual" in report["loss"]

    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(run / "model", local_files_only=True)
    assert vae.config.scaling_factor == pytest.approx(report["scaling_factor"])
    assert report["scaling_factor"] == pytest.approx(1 / report["latent_std_unscaled"])
    assert report["standardized_latent_channels"] is None  # opt-in (--standardize-latents)
    assert (run / "model" / "diffusion_pytorch_model.safetensors").exists()
    assert list((run / "samples").glob("*.png"))


def test_standardize_latent_channels():
    """Folding the channel statistics into the 1x1 convolutions: same decoded images, standardised latents."""
    from llcm.models import load_preset
    from llcm.vae import build_vae, posterior_means, standardize_latent_channels, to_model_range

    cfg = load_preset("tiny-cpu")["vae"]
    cfg.update(block_out_channels=[8, 16, 16], norm_num_groups=4, sample_size=SIZE)
    vae = build_vae(cfg, seed=1).eval()
    with torch.no_grad():  # give the channels offsets and spreads far from (0, 1), as trained VAEs have
        vae.quant_conv.bias[:4] += torch.tensor([3.0, -2.0, 0.5, 0.0])
        vae.quant_conv.weight[:4] *= torch.tensor([4.0, 0.3, 1.0, 2.0]).view(4, 1, 1, 1)
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(np.stack([shape_image(c, rng) for c in CLASSES for _ in range(6)])).permute(0, 3, 1, 2)
    x = to_model_range(pixels)
    with torch.no_grad():
        before = vae.decode(vae.encode(x).latent_dist.mean).sample
        z = posterior_means(vae, pixels)
        assert z.mean((0, 2, 3)).abs().max() > 1.0
        stats = standardize_latent_channels(vae, pixels)
        z = posterior_means(vae, pixels)
        after = vae.decode(vae.encode(x).latent_dist.mean).sample
    assert z.mean((0, 2, 3)).abs().max() < 1e-4
    assert torch.allclose(z.std((0, 2, 3)), torch.ones(4), atol=1e-4)
    assert torch.allclose(before, after, atol=1e-4)
    assert stats["channel_mean"][0] > 1.0 and len(stats["channel_std"]) == 4


def test_vae_task_saves_standardized_latents_on_request(tmp_path):
    from llcm.models import load_preset
    from llcm.vae import VAETask, build_vae, load_vae, posterior_means

    cfg = load_preset("tiny-cpu")["vae"]
    cfg.update(block_out_channels=[8, 16, 16], norm_num_groups=4, sample_size=SIZE)
    rng = np.random.default_rng(1)
    pixels = torch.from_numpy(np.stack([shape_image(c, rng) for c in CLASSES for _ in range(4)])).permute(0, 3, 1, 2)
    task = VAETask(build_vae(cfg, seed=2), pixels, steps=1, standardize_latents=True)
    task.save_model(tmp_path / "model")
    saved = load_vae(tmp_path / "model")
    z = posterior_means(saved, pixels)
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(z.std((0, 2, 3)), torch.ones(4), atol=1e-4)
    assert task.report["scaling_factor"] == pytest.approx(1.0, abs=2e-3)  # pooled vs per-channel std
    assert task.report["standardized_latent_channels"]["images"] == len(pixels)
    # the trainable keeps its own (unfolded) weights: a resumed run continues from what it trained
    assert not torch.allclose(posterior_means(task.trainable.vae, pixels).mean((0, 2, 3)), torch.zeros(4), atol=1e-3)


def test_encode_latents_cache(trained, capsys):
    data, run, tmp = trained["data"], trained["run"], trained["tmp"]
    out = tmp / "latents"
    assert main(["encode", "--data", str(data), "--model", str(run / "model"), "--out", str(out), "--quiet"]) == 0
    lat = LatentSet.load(out)
    assert lat.latents.shape == (36, 4, 8, 8)
    assert float(lat.latents.to_tensor().std()) == pytest.approx(1.0, abs=1e-3)  # scaling factor measured on these
    rows = [json.loads(x) for x in (data / "train" / "metadata.jsonl").read_text().splitlines()]
    assert lat.prompts == list(dict.fromkeys(r["text"] for r in rows))
    assert [lat.prompts[i] for i in lat.prompt_index] == [r["text"] for r in rows]
    assert lat.classes == [{v: k for k, v in CLASSES.items()}[p] for p in lat.prompts]
    report = json.loads((run / "model" / "vae_report.json").read_text())
    assert lat.meta["vae_hash"] == report["vae_hash"] and lat.meta["flip"] is False
    assert lat.meta["image_size"] == [SIZE, SIZE] and lat.meta["split"] == "train"
    assert lat.meta["grayscale"] == []  # these shapes are tinted (G = 0.9 R, B = 0.8 R): colour classes

    # the test split, never seen by the scaling factor, is still close to unit std
    assert main(["encode", "--data", str(data), "--model", str(run), "--out", str(tmp / "lt"), "--split", "test",
                 "--quiet"]) == 0
    assert float(LatentSet.load(tmp / "lt").latents.to_tensor().std()) == pytest.approx(1.0, abs=0.3)

    capsys.readouterr()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}  # latents.json and its fp16 shard(s)
    assert "latents-00000.safetensors" in stamps
    assert json.loads((out / "latents.json").read_text())["dtype"] == "float16"
    assert main(["encode", "--data", str(data), "--model", str(run / "model"), "--out", str(out), "--quiet"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    full = tmp / "full-model"  # a full model folder (vae/ subfolder) with the same VAE is the same cache
    shutil.copytree(run / "model", full / "vae")
    assert main(["encode", "--data", str(data), "--model", str(full), "--out", str(out), "--quiet"]) == 0
    assert "up to date" in capsys.readouterr().out

    # a different VAE (other weights) must not reuse or silently replace the cache
    from llcm.vae import build_vae

    other = tmp / "other-vae"
    build_vae(json.loads(trained["preset"].read_text())["vae"], seed=1).save_pretrained(other)
    assert main(["encode", "--data", str(data), "--model", str(other), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vae_hash" in err[0] and "--overwrite" in err[0]
    assert LatentSet.load(out).meta["vae_hash"] == lat.meta["vae_hash"]
    assert main(["encode", "--data", str(data), "--model", str(other), "--out", str(out), "--quiet",
                 "--overwrite"]) == 0
    assert LatentSet.load(out).meta["vae_hash"] != lat.meta["vae_hash"]


def test_encode_flip(trained):
    tmp = trained["tmp"]
    assert main(["encode", "--data", str(trained["data"]), "--model", str(trained["run"]), "--out",
                 str(tmp / "flip"), "--split", "test", "--flip", "--quiet"]) == 0
    lat = LatentSet.load(tmp / "flip")
    assert len(lat) == 24 and lat.meta["flip"] is True
    assert torch.equal(lat.prompt_index[:12], lat.prompt_index[12:])
    assert not torch.allclose(lat.latents[:12], lat.latents[12:], atol=1e-3)


def test_train_vae_dry_run(trained, capsys):
    out = trained["tmp"] / "dry"
    assert main(["train", "vae", "--data", str(trained["data"]), "--out", str(out), "--preset",
                 str(trained["preset"]), "--dry-run", "--steps", "5"]) == 0
    assert '"train_images": 36' in capsys.readouterr().out
    assert not out.exists()


def _bad_datasets(tmp: Path) -> dict[str, Path]:
    sets = {}
    sets["empty"] = tmp / "empty"
    (sets["empty"] / "train").mkdir(parents=True)
    (sets["empty"] / "train" / "metadata.jsonl").write_text("")
    sets["mixed"] = make_dataset(tmp / "mixed", per_class=(2, 0), odd_size=40)
    sets["odd"] = make_dataset(tmp / "odd", per_class=(1, 0), size=30)
    sets["missing_file"] = make_dataset(tmp / "missing_file", per_class=(1, 0))
    (sets["missing_file"] / "train" / "disk" / "000.png").unlink()
    return sets


def test_bad_inputs_one_line(trained, tmp_path, capsys):
    data, run = str(trained["data"]), str(trained["run"])
    bad = _bad_datasets(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    enc = ["encode", "--quiet", "--model", run]
    cases = {
        "data folder not found": enc + ["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o1")],
        "no 'validation' split": enc + ["--data", data, "--split", "validation", "--out", str(tmp_path / "o2")],
        "no images": enc + ["--data", str(bad["empty"]), "--out", str(tmp_path / "o3")],
        "different sizes": enc + ["--data", str(bad["mixed"]), "--out", str(tmp_path / "o4")],
        "not a multiple of the VAE factor 4": enc + ["--data", str(bad["odd"]), "--out", str(tmp_path / "o5")],
        "not found": enc + ["--data", str(bad["missing_file"]), "--out", str(tmp_path / "o6")],
        "cannot write": enc + ["--data", data, "--out", str(blocker / "sub")],
        "holds no AutoencoderKL": ["encode", "--data", data, "--model", str(tmp_path), "--out", str(tmp_path / "o7")],
        "model folder not found": ["encode", "--data", data, "--model", str(tmp_path / "x"), "--out", "o8"],
    }
    tv = ["train", "vae", "--quiet", "--preset", str(trained["preset"]), "--steps", "1"]
    cases.update({
        "data folder not found ": tv + ["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r1")],
        "cannot write to output folder": tv + ["--data", data, "--out", str(blocker / "run")],
        "has no 'vae' config": ["train", "vae", "--preset", "sd15", "--data", data, "--out", str(tmp_path / "r2")],
        "different sizes ": tv + ["--data", str(bad["mixed"]), "--out", str(tmp_path / "r3")],
    })
    for expect, argv in cases.items():
        capsys.readouterr()
        assert main(argv) == 2, expect
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expect.strip() in err[0], (expect, err)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r3").exists()


def test_train_subparsers_shared():
    import argparse

    from llcm.cli.options import train_subparsers

    sub = argparse.ArgumentParser().add_subparsers(dest="command")
    assert train_subparsers(sub) is train_subparsers(sub)


def test_teacher_unet_follows_the_vae_latent_channels(trained, tmp_path, capsys):
    """A VAE with 8 latent channels: `train teacher --model VAE` builds its fresh tiny UNet for 8 channels."""
    from diffusers import UNet2DConditionModel

    from llcm.vae import build_vae

    cfg = json.loads(trained["preset"].read_text())["vae"]
    build_vae({**cfg, "latent_channels": 8}, seed=0).save_pretrained(tmp_path / "vae8")
    lat = tmp_path / "lat8"
    assert main(["encode", "--data", str(trained["data"]), "--model", str(tmp_path / "vae8"), "--out", str(lat),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", "teacher", "--latents", str(lat), "--model", str(tmp_path / "vae8"), "--out",
                 str(tmp_path / "t"), "--steps", "2", "--batch", "4", "--quiet"]) == 0
    assert "8 latent channels" in capsys.readouterr().out
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "t" / "model", subfolder="unet", local_files_only=True)
    assert (unet.config.in_channels, unet.config.out_channels) == (8, 8)
    # and the rest of the chain runs on 8-channel latents: distillation, then few-step sampling at the size
    # trained (the fresh UNet records its latent size, 8x8 here, where the preset says 16x16)
    assert main(["distill", "--teacher", str(tmp_path / "t" / "model"), "--latents", str(lat), "--out",
                 str(tmp_path / "s"), "--steps", "2", "--batch", "4", "--quiet"]) == 0
    from llcm.pipeline import LLCMPipeline

    images = LLCMPipeline.from_pretrained(tmp_path / "s" / "model")(["a prompt"] * 2, steps=2, seeds=0).images
    assert images.shape == (2, SIZE, SIZE, 3) and np.isfinite(images).all()


def test_hard_pixel_term_is_the_mean_of_the_worst_pixels():
    """VAELoss adds w * mean of the top 2% per-pixel squared errors; w = 0 leaves the plain loss."""
    from llcm.errors import UserError
    from llcm.vae import HARD_PIXEL_SHARE, VAELoss

    x = torch.zeros(2, 3, 50, 50)  # 2500 pixels -> the worst 50
    recon = torch.zeros_like(x)
    recon[0, :, :5, :2] = 1.0  # image 0: 10 pixels off by 1 on every channel (a small "finding" missed)
    recon[1] += 0.1  # image 1: every pixel off by 0.1

    def net(x_, noise):
        return recon, torch.zeros(len(x_)), torch.zeros(len(x_), 4, 2, 2)

    batch = {"x": x, "noise": None}
    plain = VAELoss(0.0)(net, batch)
    hard = VAELoss(0.0, hard_pixel_weight=3.0)(net, batch)
    k = round(HARD_PIXEL_SHARE * 2500)
    assert k == 50
    # image 0: 10 of its worst 50 pixels have squared error 1, the rest 0; image 1: all 0.01
    assert torch.allclose(hard - plain, torch.tensor([3.0 * 10 / k, 3.0 * 0.01]), atol=1e-6)
    # the missed finding weighs ~1% in the plain loss and ~60x more in the hard term
    assert plain[0] == pytest.approx(2 * 10 / 2500, abs=1e-6)
    with pytest.raises(UserError, match="hard_pixel_weight"):
        VAELoss(0.0, hard_pixel_weight=-1.0)


def test_train_vae_with_hard_pixel_weight_records_it(trained, tmp_path):
    out = tmp_path / "hard"
    rc = main(["train", "vae", "--data", str(trained["data"]), "--init", str(trained["run"] / "model"),
               "--out", str(out), "--steps", "3", "--batch", "4", "--hard-pixel-weight", "5", "--quiet"])
    assert rc == 0
    assert json.loads((out / "config.json").read_text())["hard_pixel_weight"] == 5.0
    report = json.loads((out / "model" / "vae_report.json").read_text())
    assert report["hard_pixel_weight"] == 5.0 and "worst 2% of pixels" in report["loss"]
    assert main(["train", "vae", "--data", str(trained["data"]), "--out", str(tmp_path / "bad"),
                 "--hard-pixel-weight", "-1", "--quiet"]) != 0
    assert not (tmp_path / "bad").exists()

