"""FRD (llcm radiomics features) inside `llcm evaluate`: finite per run and per class, cached like the FID
features, larger for degraded images than for fresh draws of the real images' generator, left out by --no-frd,
skipped with a note (not a failure) without scikit-image.

No model is sampled: the runs are `:images` folders written here (the evaluation's own blob dataset drawn with
another seed, then the same images with heavy noise and with a heavy blur), so a whole evaluation takes seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

pytest.importorskip("skimage")

from llcm.cli import main  # noqa: E402
from llcm.errors import UserError  # noqa: E402
from llcm.evaluation.evaluate import EvalConfig, evaluate, parse_model_spec  # noqa: E402
from llcm.evaluation.features import extract_features  # noqa: E402
from llcm.evaluation.radiomics import RadiomicsExtractor, frd  # noqa: E402
from test_evaluate import Cells, make_dataset  # noqa: E402

PER_CLASS = 6


def image_runs(root: Path) -> dict[str, Path]:
    """`:images` folders RUN/1/<class>/<i>.png: near (new draws of the real generator), noisy, blurred."""
    draw = make_dataset(root / "draw", n_train=0, n_test=PER_CLASS, seed=1)
    rng = np.random.default_rng(2)
    runs = {name: root / name / "1" for name in ("near", "noisy", "blurred")}
    for src in sorted((draw / "test").rglob("*.png")):
        x = np.asarray(Image.open(src)).astype(np.float64)
        degraded = {"near": x, "noisy": x + rng.normal(0, 60, x.shape),
                    "blurred": ndimage.gaussian_filter(x, (2.5, 2.5, 0))}
        for name, y in degraded.items():
            dst = runs[name] / src.relative_to(draw / "test")
            dst.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(y.round().clip(0, 255).astype(np.uint8)).save(dst)
    shutil.rmtree(draw)
    return {name: folder.parent for name, folder in runs.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("frdworld")
    return make_dataset(root / "data"), image_runs(root / "runs"), root


def args(data, out, runs, *extra) -> list[str]:
    a = ["evaluate", "--data", str(data), "--out", str(out), "--extractor", "filterbank", "--per-class",
         str(PER_CLASS), "--no-memorization", "--no-classifier", "--quiet", *extra]
    for name, folder in runs.items():
        a += ["--model", f"{name}={folder}:images"]
    return a


@pytest.fixture(scope="module")
def evaluated(world):
    data, runs, root = world
    out = root / "eval"
    assert main(args(data, out, runs)) == 0
    return out, json.loads((out / "results.json").read_text())


def test_frd_per_run_and_class_is_finite_and_ranks_degradations(evaluated):
    out, results = evaluated
    runs = {r["model"]: r for r in results["runs"]}
    classes = [c["name"] for c in results["classes"]]
    for r in runs.values():
        assert np.isfinite(r["metrics"]["frd"])
        assert all(np.isfinite(r["per_class"][c]["frd"]) for c in classes)
    near = runs["near"]["metrics"]["frd"]
    assert runs["noisy"]["metrics"]["frd"] > near + 1 and runs["blurred"]["metrics"]["frd"] > near + 1
    for c in classes:  # per class too: 8 real and 6 generated images per class are enough for these gaps
        assert runs["noisy"]["per_class"][c]["frd"] > runs["near"]["per_class"][c]["frd"]
        assert runs["blurred"]["per_class"][c]["frd"] > runs["near"]["per_class"][c]["frd"]
    f = results["frd"]
    assert f["skipped"] is None and f["features"] == RadiomicsExtractor.dim and f["extractor"] == "radiomics"
    assert "llcm radiomics features" in f["description"] and "frd-score" in f["description"]
    agree = f["rank_agreement_with_fid"]
    assert agree["n_runs"] == 3 and agree["n_cells"] == 3 * len(classes)
    assert -1 <= agree["runs"] <= 1 and -1 <= agree["cells"] <= 1
    assert results["settings"]["frd"] is True


def test_frd_matches_a_recomputation_and_is_cached(evaluated, world):
    """results.json's FRD from radiomics features extracted here (the cache keeps float32 features: rel 1e-4)."""
    out, results = evaluated
    data, runs, _ = world
    ex = RadiomicsExtractor()
    rows = [json.loads(line) for line in (data / "test" / "metadata.jsonl").read_text().splitlines()]
    real = extract_features(ex, [data / "test" / r["file_name"] for r in rows], progress=False)
    noisy = next(r for r in results["runs"] if r["model"] == "noisy")
    files = sorted((runs["noisy"] / "1").rglob("*.png"))
    fake = extract_features(ex, files, progress=False)
    assert noisy["metrics"]["frd"] == pytest.approx(frd(real, fake), rel=1e-4)
    c = "top-bar"
    in_c = np.array([f.parent.name == c for f in files])
    real_c = real[[r["class"] == c for r in rows]]
    assert noisy["per_class"][c]["frd"] == pytest.approx(frd(real_c, fake[in_c]), rel=1e-4)
    assert (out / "cache" / "real-test.radiomics.npz").is_file()
    assert len(list((out / "features").glob("*.radiomics.npz"))) == 3


def test_report_shows_frd_beside_fid(evaluated):
    out, results = evaluated
    page = (out / "report.html").read_text(encoding="utf-8")
    parser = Cells()
    parser.feed(page)
    keys = [a.get("data-key") for a, _ in parser.cells]
    for i in range(3):  # in the run table, the FRD cell follows the FID cell
        assert keys[keys.index(f"/runs/{i}/metrics/frd") - 1] == f"/runs/{i}/metrics/fid"
        assert f"/runs/{i}/per_class/top-bar/frd" in keys
    assert any("Per-class FRD" in cap and "radiomics" in cap for cap in parser.captions)
    assert {a["data-key"] for a in parser.spans} >= {"/frd/rank_agreement_with_fid/runs",
                                                     "/frd/rank_agreement_with_fid/cells", "/frd/features"}
    assert "not comparable with frd-score" in page


def test_no_frd_leaves_it_out(world, tmp_path, capsys):
    data, runs, _ = world
    assert main(args(data, tmp_path / "e", {"near": runs["near"]}, "--no-frd")) == 0
    assert "FRD" not in capsys.readouterr().out
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert "frd" not in results and results["settings"]["frd"] is False and "--no-frd" in results["command"]
    r = results["runs"][0]
    assert "frd" not in r["metrics"] and all("frd" not in pc for pc in r["per_class"].values())
    assert not list((tmp_path / "e").rglob("*.radiomics.npz"))
    assert "Per-class FRD" not in (tmp_path / "e" / "report.html").read_text(encoding="utf-8")


def test_without_scikit_image_frd_is_skipped_with_a_note(world, tmp_path, capsys, monkeypatch):
    import llcm.evaluation.radiomics as radiomics

    def missing():
        raise UserError("the 'radiomics' extractor needs scikit-image (`pip install scikit-image`)")

    monkeypatch.setattr(radiomics, "_skimage_glcm", missing)
    data, runs, _ = world
    cfg = EvalConfig(data=str(data), models=[parse_model_spec(f"near={runs['near']}:images")],
                     out=str(tmp_path / "e"), per_class=PER_CLASS, extractor="filterbank", memorization=False,
                     classifier=False, progress=False)
    results = evaluate(cfg, process_index=0, num_processes=1)
    err = capsys.readouterr().err
    assert err.count("FRD skipped") == 1 and "scikit-image" in err
    assert "scikit-image" in results["frd"]["skipped"] and results["frd"]["rank_agreement_with_fid"] is None
    assert "frd" not in results["runs"][0]["metrics"] and np.isfinite(results["runs"][0]["metrics"]["fid"])
    page = (tmp_path / "e" / "report.html").read_text(encoding="utf-8")
    assert "FRD not computed" in page and "Per-class FRD" not in page
