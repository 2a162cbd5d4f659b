"""The open-world corpus (`llcm data openworld`) and the anchored VAE fine-tune (`llcm train vae --anchor`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llcm.cli import main
from llcm.data import openworld
from test_vae_encode import CLASSES, make_dataset, micro_preset, shape_image


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one thread on a shared 2-core machine


@pytest.fixture
def fake_modalities(monkeypatch):
    """Two modalities whose pixels are their own coordinates: a 10-frame cine and a 320 x 80 still."""
    cine = [np.full((70, 90), i / 10, np.float32) for i in range(10)]
    ids = np.arange(320 * 80, dtype=np.float32).reshape(320, 80)
    fake = {
        "cine": openworld.Modality("cine", "a cine", lambda: [cine], True, "test"),
        "still": openworld.Modality("still", "a still", lambda: [[ids]], False, "test"),
    }
    monkeypatch.setattr(openworld, "MODALITIES", fake)
    return ids


def test_train_and_test_never_share_pixels(fake_modalities):
    ids = fake_modalities
    train = np.concatenate([p.ravel() for p in openworld.regions("still", "train")])
    test = np.concatenate([p.ravel() for p in openworld.regions("still", "test")])
    assert not set(train.tolist()) & set(test.tolist())
    assert len(train) + len(test) == ids.size and len(test) == ids.size // 4  # 2 of 8 bands
    # test bands 3 and 7 of 8 lie between train bands (same anatomy, same scales)
    assert [float(p[0, 0]) for p in openworld.regions("still", "test")] == [80 * 80, 240 * 80]
    assert {p.shape for p in openworld.regions("still", "train")} == {(40, 80)}
    frames_train = {float(f[0, 0]) for f in openworld.regions("cine", "train")}
    frames_test = {float(f[0, 0]) for f in openworld.regions("cine", "test")}
    assert len(frames_train) == 8 and len(frames_test) == 2 and not frames_train & frames_test
    with pytest.raises(Exception, match="split"):
        openworld.regions("still", "val")


def test_corpus_is_seeded_per_modality(fake_modalities):
    both, labels = openworld.corpus(["cine", "still"], 6, 32, seed=3)
    alone, _ = openworld.corpus(["still"], 6, 32, seed=3)
    again, _ = openworld.corpus(["cine", "still"], 6, 32, seed=3)
    assert both.shape == (12, 32, 32, 3) and both.dtype == np.uint8 and labels == ["cine"] * 6 + ["still"] * 6
    assert np.array_equal(both, again)
    assert np.array_equal(both[6:], alone)  # leaving a modality out does not change the others' crops
    assert not np.array_equal(openworld.corpus(["still"], 6, 32, seed=4)[0], alone)
    with pytest.raises(Exception, match="unknown modality"):
        openworld.corpus(["x-ray-of-mars"], 1, 32)


def test_real_modalities_load_and_crop():
    """Every modality's shipped pixels load; held-out ones are the three unseen kinds."""
    assert set(openworld.HELD_OUT) == {"ultrasound", "microscopy", "nuclear-medicine"}
    for name in openworld.MODALITIES:
        imgs, _ = openworld.corpus([name], 2, 64, seed=0, split="test")
        assert imgs.shape == (2, 64, 64, 3) and imgs.std() > 3, name


def test_openworld_command_writes_a_dataset_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "us"
    args = ["data", "openworld", "--out", str(out), "--modality", "ultrasound", "--train-per-modality", "5",
            "--test-per-modality", "3", "--no-augment", "--quiet"]
    assert main(args) == 0
    from llcm.vae import load_pixels, scan_split

    split = scan_split(out, "train", 4)
    assert len(split) == 5 and set(split.texts) == {"echocardiography ultrasound image"}
    assert load_pixels(scan_split(out, "test", 4)).shape == (3, 3, 64, 64)
    before = sorted(p.name for p in (out / "train" / "ultrasound").iterdir())
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "train" / "ultrasound").iterdir()) == before
    assert main(["data", "openworld", "--out", str(tmp_path / "x"), "--modality", "nope", "--quiet"]) == 2
    assert not (tmp_path / "x").exists()


def test_anchor_rows_hold_latents_and_decode_to_the_initial_decoder():
    from llcm.vae import VAELoss

    x = torch.zeros(3, 3, 8, 8)
    mean = torch.zeros(3, 4, 2, 2)
    mean[0] += 0.5  # drifted by 0.5 everywhere
    mean[1] += 0.5  # drifted too, but not an anchor row
    seen = {}

    def net(x_, noise, z=None, given=None):
        seen.update(z=z, given=given)
        return x_.clone(), torch.zeros(len(x_)), mean

    target = torch.zeros(3, 3, 8, 8)
    target[2] += 0.25  # what the initial decoder made of row 2's noisy latent: the decoded row must match it
    batch = {"x": x, "noise": None, "anchor": torch.tensor([True, False, True]), "anchor_mean": torch.zeros(3, 4, 2, 2),
             "z": torch.ones(3, 4, 2, 2), "target": target}
    loss = VAELoss(0.0, anchor_weight=10.0, scaling_factor=2.0)(net, batch)
    assert torch.allclose(loss, torch.tensor([10.0 * (2.0 * 0.5) ** 2, 0.0, 0.25 + 0.25 ** 2]))
    assert seen["given"] is batch["anchor"] and seen["z"] is batch["z"]
    plain = {k: batch[k] for k in ("x", "noise")}
    assert torch.allclose(VAELoss(0.0)(net, plain), torch.zeros(3))


def test_vae_model_decodes_given_latents_on_anchor_rows():
    from llcm.models import load_preset
    from llcm.vae import VAEModel, build_vae

    cfg = load_preset("tiny-cpu")["vae"]
    cfg.update(block_out_channels=[8, 16, 16], norm_num_groups=4, sample_size=16)
    vae = build_vae(cfg, seed=0).eval()
    x, noise, z = torch.randn(2, 3, 16, 16), torch.zeros(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    out, _, _ = VAEModel(vae)(x, noise, z, torch.tensor([False, True]))
    with torch.no_grad():
        assert torch.allclose(out[1], vae.decode(z[1:]).sample[0], atol=1e-5)
        assert torch.allclose(out[0], vae.decode(vae.encode(x[:1]).latent_dist.mean).sample[0], atol=1e-5)


def test_anchored_fine_tune_keeps_old_latents_and_scaling_factor(tmp_path):
    """Fine-tuning on new images with --anchor: the anchor images' latents move far less than without it,
    and the saved VAE keeps the initial scaling factor (so a teacher on the old latents stays valid)."""
    from llcm.vae import load_pixels, load_vae, posterior_means, scan_split

    old_data = make_dataset(tmp_path / "old", per_class=(8, 2))
    preset = micro_preset(tmp_path / "micro.json")
    base = tmp_path / "base"
    assert main(["train", "vae", "--data", str(old_data), "--out", str(base), "--preset", str(preset), "--steps", "20",
                 "--batch", "8", "--lr", "2e-3", "--quiet"]) == 0
    new_data = make_dataset(tmp_path / "new", per_class=(8, 2), seed=5)
    for f in (new_data / "train").rglob("*.png"):  # a different kind of image: inverted, tinted blue
        from PIL import Image

        a = 255 - np.asarray(Image.open(f))
        Image.fromarray(np.ascontiguousarray(a[..., ::-1])).save(f)
    old_px = load_pixels(scan_split(old_data, "train", 4))
    z0 = posterior_means(load_vae(base / "model"), old_px)
    drift = {}
    for name, extra in (("free", []), ("anchored", ["--anchor", str(old_data), "--anchor-weight", "30"])):
        out = tmp_path / name
        assert main(["train", "vae", "--data", str(new_data), "--init", str(base / "model"), "--out", str(out),
                     "--steps", "15", "--batch", "8", "--lr", "2e-3", "--quiet", *extra]) == 0
        z = posterior_means(load_vae(out / "model"), old_px)
        drift[name] = float((z - z0).norm() / z0.norm())
    report = json.loads((tmp_path / "anchored" / "model" / "vae_report.json").read_text())
    base_sf = load_vae(base / "model").config.scaling_factor
    assert report["scaling_factor"] == pytest.approx(base_sf) and "kept" in report["scaling_factor_from"]
    assert report["anchor_latent_drift_rel"] == pytest.approx(drift["anchored"], rel=1e-3)
    assert drift["anchored"] < 0.5 * drift["free"], drift
    assert main(["train", "vae", "--data", str(new_data), "--anchor", str(old_data), "--out", str(tmp_path / "bad"),
                 "--quiet"]) == 2  # --anchor without --init
    assert not (tmp_path / "bad").exists()


def test_latents_without_images_are_decoded_as_the_initial_decoder_does():
    """--anchor-model: a student's samples join the anchor as latent-only rows (a blank image for the encoder)."""
    from llcm.models import load_preset
    from llcm.vae import VAETask, build_vae

    cfg = load_preset("tiny-cpu")["vae"]
    cfg.update(block_out_channels=[8, 16, 16], norm_num_groups=4, sample_size=16)
    vae = build_vae(cfg, seed=0)
    rng = np.random.default_rng(0)
    px = lambda n: torch.from_numpy(rng.integers(0, 255, (n, 3, 16, 16), dtype=np.uint8))  # noqa: E731
    samples = torch.randn(3, 4, 4, 4)
    task = VAETask(vae, px(4), anchor_pixels=px(2), anchor_latents=samples)
    assert task.num_examples() == 9 and task.n_images == 6
    batch = task.draw(torch.arange(9), torch.Generator().manual_seed(0))
    assert batch["anchor"].tolist() == [False] * 4 + [True] * 2 + [False] * 3  # the encoder holds image rows only
    assert batch["given"].tolist() == [False] * 4 + [True] * 5
    with torch.no_grad():
        want = task.anchor_decoder.decode(batch["z"][6:]).sample
    assert torch.allclose(batch["target"][6:], want, atol=1e-5)
    assert (batch["z"][6:] - samples).abs().max() < 5  # the samples plus bounded noise
    assert torch.equal(batch["target"][:4], batch["x"][:4])
    report = task.evaluate()
    assert report["anchor_images"] == 2 and report["anchor_decoded_latents"] == 3


def test_hue_rotation_keeps_grey_and_turns_red_into_green():
    rng = np.random.default_rng(0)
    colour = rng.random((4, 4, 3))
    grey = np.repeat(colour[..., :1], 3, axis=2)
    assert np.allclose(openworld.hue_saturation(colour, 0.0, 1.0), colour)
    assert np.allclose(openworld.hue_saturation(grey, 1.3, 1.5), grey)  # grey pixels have no hue
    turned = openworld.hue_saturation(np.array([[[0.9, 0.4, 0.1]]]), 2 * np.pi / 3, 1.0)
    assert np.allclose(turned, [[[0.1, 0.9, 0.4]]])  # a third of a turn: R -> G -> B
    half = openworld.hue_saturation(colour, 0.0, 0.5)
    assert np.allclose(half - colour.mean(2, keepdims=True), 0.5 * (colour - colour.mean(2, keepdims=True)))
