"""The embedded dataset: offline, deterministic, varied, and built through `build_dataset`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from llcm.data import build_mini, read_split
from llcm.data.cleaning import hamming, perceptual_hash
from llcm.data.mini import CLASSES, DEFAULT_PER_CLASS, TRAIN_PER_CLASS

pytest.importorskip("skimage")
pytest.importorskip("nilearn")


@pytest.fixture(scope="module")
def small_mini(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini") / "mini"
    build_mini(out, size=64, seed=0, per_class=8, workers=1, progress=False)
    return out


def test_defaults_give_the_promised_split():
    assert TRAIN_PER_CLASS >= 300 and DEFAULT_PER_CLASS - TRAIN_PER_CLASS >= 100
    assert len(CLASSES) >= 8 and len({c.modality for c in CLASSES}) >= 4
    assert len({c.prompt for c in CLASSES}) == len(CLASSES)


def test_small_mini_layout_and_card(small_mini):
    stats = json.loads((small_mini / "stats.json").read_text())
    assert stats["totals"]["classes"] == len(CLASSES) and stats["rejections"] == {}
    # 8 images per class, far below the cap: the default --test-fraction puts one of each in test
    assert {(c["train"], c["test"]) for c in stats["classes"].values()} == {(7, 1)}
    assert not stats["unmapped"]
    rows = read_split(small_mini, "train")
    assert len(rows) == 7 * len(CLASSES) and len(read_split(small_mini, "test")) == len(CLASSES)
    assert len({r["text"] for r in rows}) == len(CLASSES) and len({r["modality"] for r in rows}) >= 4
    for r in rows[:: 7]:
        with Image.open(r["path"]) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    card = (small_mini / "card.md").read_text()
    assert "Provenance of the embedded dataset" in card and "MNI ICBM152" in card
    assert "| brain-mri-axial-t1 | MRI | brain | normal | 7 | 1 | axial brain MRI, T1-weighted |" in card


def test_images_vary_within_each_class(small_mini):
    rows = read_split(small_mini, "train")
    by_class: dict[str, list[int]] = {}
    for r in rows:
        by_class.setdefault(r["class"], []).append(perceptual_hash(np.asarray(Image.open(r["path"]))))
    for cls, hashes in by_class.items():
        d = [hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]]
        assert min(d) > 12, cls  # no near duplicates: not one picture repeated
    means = {cls: np.mean([np.asarray(Image.open(r["path"]), float).mean(axis=(0, 1)) for r in rows
                           if r["class"] == cls], axis=0) for cls in by_class}
    assert means["fundus-normal"][0] > means["fundus-normal"][2] + 40  # fundus is red-orange
    assert abs(means["head-ct-normal"][0] - means["head-ct-normal"][2]) < 1  # CT is gray


def test_mini_is_deterministic_and_up_to_date(small_mini, tmp_path):
    stamps = {p: p.stat().st_mtime_ns for p in small_mini.rglob("*") if p.is_file()}
    build_mini(small_mini, size=64, seed=0, per_class=8, workers=1, progress=False)
    assert {p: p.stat().st_mtime_ns for p in small_mini.rglob("*") if p.is_file()} == stamps  # nothing rewritten
    other = tmp_path / "again"
    build_mini(other, size=64, seed=0, per_class=8, workers=1, progress=False)
    files = sorted(p.relative_to(small_mini) for p in small_mini.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    for f in files:
        assert (small_mini / f).read_bytes() == (other / f).read_bytes(), f


def test_cli_mini_128(tmp_path, capsys, monkeypatch):
    import llcm.cli
    from llcm.cli import main

    monkeypatch.setattr(llcm.cli, "COMMAND_MODULES", ["llcm.cli.data"])  # only this stage's commands

    out = tmp_path / "m128"
    assert main(["data", "mini", "--out", str(out), "--size", "128", "--per-class", "3", "--workers", "1",
                 "--quiet"]) == 0
    assert f"{len(CLASSES)} classes, {2 * len(CLASSES)} train, {len(CLASSES)} test" in capsys.readouterr().out
    row = read_split(out, "train")[0]
    assert Image.open(row["path"]).size == (128, 128)


@pytest.mark.skipif(not os.environ.get("LLCM_TEST_FULL_MINI"), reason="set LLCM_TEST_FULL_MINI=1 (about a minute)")
def test_full_mini(tmp_path):
    out = build_mini(tmp_path / "full", progress=False)
    stats = json.loads((out / "stats.json").read_text())
    for cls, c in stats["classes"].items():
        assert c["train"] >= 300 and c["test"] >= 100, cls
