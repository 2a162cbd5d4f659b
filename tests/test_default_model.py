"""The trained default model shipped inside the package: present, intact, loadable offline, and it still
draws the image its card documents (recipes/ship_default.py wrote card.json and reference.png)."""

import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llcm.pipeline import default_model_path, load_pipeline

MAX_BYTES = 30 * 10**6


@pytest.fixture(scope="module")
def folder() -> Path:
    path = default_model_path()
    assert path is not None, "src/llcm/default_model is missing: run recipes/mini.sh and recipes/ship_default.py"
    return path


@pytest.fixture(scope="module")
def card(folder) -> dict:
    return json.loads((folder / "card.json").read_text())


def test_files_match_the_card_hashes(folder, card):
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert on_disk - {"README.md", "card.json"} == set(card["files"])
    for name, digest in card["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    readme = (folder / "README.md").read_text()
    for digest in card["files"].values():  # the human-readable card lists the same hashes
        assert digest in readme


def test_size_budget_and_safetensors_only(folder, card):
    assert sum((folder / f).stat().st_size for f in card["files"]) <= MAX_BYTES
    weights = [f for f in card["files"] if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    assert weights == []
    assert sum(f.endswith(".safetensors") for f in card["files"]) == 3  # unet, vae, text encoder


def test_loads_without_fallback_and_knows_its_classes(card):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the untrained fallback warns: it must not be taken
        pipe = load_pipeline(None)
    assert pipe.model_hash == card["model_hash"]
    assert len(pipe.config.classes) == 10
    assert pipe.config.w_min <= pipe.config.w_default <= pipe.config.w_max


def test_reference_image_is_reproduced(folder, card):
    ref = card["reference"]
    pipe = load_pipeline(None)
    gen = pipe([ref["prompt"]] * len(ref["seeds"]), steps=ref["steps"], seeds=ref["seeds"])
    from llcm.images import make_grid

    ours = np.asarray(make_grid(gen.pil_images(), cols=len(ref["seeds"])), dtype=np.int16)
    theirs = np.asarray(Image.open(folder / ref["file"]).convert("RGB"), dtype=np.int16)
    assert ours.shape == theirs.shape
    diff = np.abs(ours - theirs)
    # float differences across CPUs/BLAS builds move a few pixels by a level or two, never the picture
    assert diff.max() <= 4 and diff.mean() < 0.05, (diff.max(), diff.mean())
    assert gen.timesteps == ref["timesteps"] and gen.w == ref["w"]


def test_generate_command_uses_the_default_model(tmp_path, card):
    out = tmp_path / "gen"
    proc = subprocess.run([sys.executable, "-m", "llcm.cli", "generate", "axial brain MRI", "--steps", "2",
                           "--batch", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert card["model_hash"] in proc.stdout
    assert "sagittal brain MRI, T1-weighted" in proc.stdout  # the prompt is not a class: the classes are listed
    png = Image.open(out / "000_seed0.png")
    assert png.text["llcm:model_hash"] == card["model_hash"]
    assert png.text["llcm:prompt"] == "axial brain MRI" and png.text["llcm:steps"] == "2"
    assert (out / "grid.png").exists()
