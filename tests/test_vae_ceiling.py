"""bench/vae_ceiling.py: the VAE's reconstructions of the test split, written where `llcm evaluate` reads
an `:images` run, each equal to decode(encode(x)) of the right test image."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llcm.cli import main as llcm_main
from llcm.vae import reconstruct
from test_evaluate import make_dataset
from train_worker import micro_components

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "vae_ceiling.py"


def load_script():
    spec = importlib.util.spec_from_file_location("vae_ceiling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reconstructions_are_written_in_the_images_layout_and_scored(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n_train=4, n_test=5)
    vae = micro_components(0).vae
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    out = tmp_path / "recon"
    assert load_script().main(["--data", str(data), "--model", str(tmp_path / "vae"), "--out", str(out),
                               "--per-class", "3"]) == 0
    assert "llcm evaluate" in capsys.readouterr().out

    rows = [json.loads(line) for line in (data / "test" / "metadata.jsonl").read_text().splitlines()]
    classes = sorted({r["class"] for r in rows})
    assert sorted(p.name for p in (out / "1").iterdir()) == classes
    for name in classes:
        firsts = sorted(r["file_name"] for r in rows if r["class"] == name)[:3]
        pixels = torch.from_numpy(np.stack([np.asarray(Image.open(data / "test" / f).convert("RGB"))
                                            for f in firsts])).permute(0, 3, 1, 2)
        with torch.no_grad():
            expected = (reconstruct(vae.eval(), pixels).permute(0, 2, 3, 1).numpy() * 255).round()
        written = np.stack([np.asarray(Image.open(out / "1" / name / f"{i}.png")) for i in range(3)]).astype(float)
        assert np.abs(written - expected).max() <= 1.0
    report = json.loads((out / "reconstructions.json").read_text())
    assert set(report["psnr_db_per_class"]) == set(classes)

    # the folder is what `llcm evaluate` takes as an images run
    ev = tmp_path / "eval"
    assert llcm_main(["evaluate", "--data", str(data), "--out", str(ev), "--model", f"vae-recon={out}:images@1",
                      "--per-class", "3", "--extractor", "filterbank", "--no-memorization", "--no-classifier",
                      "--quiet"]) == 0
    run = json.loads((ev / "results.json").read_text())["runs"][0]
    assert run["kind"] == "images" and run["n_images"] == 3 * len(classes)


def test_a_non_empty_out_folder_is_refused_untouched(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=2, n_test=2)
    micro_components(0).vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    out = tmp_path / "recon"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        load_script().main(["--data", str(data), "--model", str(tmp_path / "vae"), "--out", str(out)])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
