"""`llcm evaluate` end to end on a tiny offline world: report numbers trace back to results.json, which
match an independent recomputation; resume, process split, refusal of mixed runs, planted copies flagged,
the classifier check added to a finished evaluation without touching its images.

The world: a 4-class 32x32 image dataset drawn here and untrained micro models (tests/train_worker.py's
MICRO preset) saved as llcm folders; untrained weights are enough to test the harness.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llcm.cli import main
from llcm.errors import UserError
from llcm.evaluation import extract_features, fid, get_extractor
from llcm.evaluation.evaluate import (EvalConfig, class_table, generate, image_path, parse_model_spec, plan_runs,
                                      seed_of)
from llcm.evaluation.report import resolve
from train_worker import PROMPTS, micro_components

CENTRES = [(0.3, 0.5), (0.7, 0.5), (0.5, 0.25), (0.5, 0.75)]


def make_dataset(root: Path, n_train: int = 12, n_test: int = 8, size: int = 32, seed: int = 0) -> Path:
    """train/ and test/ imagefolders with metadata.jsonl (file_name, text, class), one blob position per class."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for prompt, (cx, cy) in zip(PROMPTS, CENTRES):
            name = prompt.replace(" ", "-")
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                x0, y0, r = cx + rng.normal(0, 0.05), cy + rng.normal(0, 0.05), 0.1 + rng.uniform(0, 0.06)
                img = np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * r * r)) + rng.normal(0, 0.05, (size, size))
                rgb = (np.stack([img, img * 0.8, img * 0.6], -1).clip(0, 1) * 255).astype(np.uint8)
                fn = f"{name}/{i:03d}.png"
                Image.fromarray(rgb).save(root / split / fn)
                rows.append({"file_name": fn, "text": prompt, "class": name})
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def make_models(root: Path) -> dict[str, Path]:
    """An (untrained) micro teacher and two consistency models with a non-zero w-embedding, as llcm folders."""
    from llcm.models import add_guidance_embedding
    from llcm.pipeline import LLCMConfig, save_model_folder
    from llcm.schedules import Schedule

    comps = micro_components(0)
    paths = {"teacher": root / "teacher", "lcm": root / "lcm", "llcm": root / "llcm"}
    save_model_folder(comps, Schedule.scaled_linear(), LLCMConfig(classes=PROMPTS), paths["teacher"],
                      overwrite=True, pipeline_class="StableDiffusionPipeline")
    for i, name in enumerate(["lcm", "llcm"]):
        unet = add_guidance_embedding(micro_components(0).unet)
        with torch.no_grad():
            unet.time_embedding.cond_proj.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
        cfg = LLCMConfig(k=100, w_min=0.0, w_max=2.0, w_default=1.0, solver=["ddim", "leapfrog"][i], classes=PROMPTS)
        save_model_folder(dataclasses.replace(comps, unet=unet), Schedule.scaled_linear(), cfg, paths[name],
                          overwrite=True)
    return paths


pytestmark = pytest.mark.usefixtures("one_torch_thread")


MODELS = ["teacher={teacher}:ddim@3", "teacher={teacher}:dpmpp@2", "llcm={llcm}"]


def eval_args(data, out, paths, *extra) -> list[str]:
    args = ["evaluate", "--data", str(data), "--out", str(out), "--steps", "1,2", "--per-class", "3",
            "--extractor", "filterbank", "--batch", "8", "--quiet", *extra]
    for m in MODELS:
        args += ["--model", m.format(**{k: str(v) for k, v in paths.items()})]
    return args


def eval_config(data, out, paths, **kw) -> EvalConfig:
    specs = [parse_model_spec(m.format(**{k: str(v) for k, v in paths.items()})) for m in MODELS]
    return EvalConfig(data=str(data), models=specs, out=str(out), steps=(1, 2), per_class=3, extractor="filterbank",
                      batch_size=8, progress=False, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalworld")
    return make_dataset(root / "data"), make_models(root / "models"), root


@pytest.fixture(scope="module")
def evaluated(world):
    data, paths, root = world
    out = root / "eval"
    assert main(eval_args(data, out, paths)) == 0
    results = json.loads((out / "results.json").read_text())
    return out, results, (out / "report.html").read_text(encoding="utf-8")


class Cells(HTMLParser):
    """Every <td> (attributes + text), every <caption> text and every number <span> of a page."""

    def __init__(self):
        super().__init__()
        self.cells, self.captions, self.spans, self._cur, self._cap = [], [], [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "span" and dict(attrs).get("class") == "num":
            self.spans.append(dict(attrs))
        if tag == "td":
            self._cur = [dict(attrs), ""]
        elif tag == "caption":
            self._cap = ""

    def handle_endtag(self, tag):
        if tag == "td" and self._cur is not None:
            self.cells.append(self._cur)
            self._cur = None
        elif tag == "caption" and self._cap is not None:
            self.captions.append(self._cap)
            self._cap = None

    def handle_data(self, data):
        if self._cur is not None:
            self._cur[1] += data
        if self._cap is not None:
            self._cap += data


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def test_every_table_number_comes_from_results_json(evaluated):
    out, results, page = evaluated
    parser = Cells()
    parser.feed(page)
    numeric = [(a, t) for a, t in parser.cells if a.get("class") == "num"]
    assert len(numeric) > 100
    for attrs, text in numeric:
        value = resolve(results, attrs["data-key"])
        assert json.loads(attrs["data-value"]) == value, attrs
        assert float(text) == pytest.approx(value, rel=1e-3, abs=1e-12), (attrs, text)
    for attrs, text in parser.cells:  # no number typed into a table without its source
        if _is_number(text.strip()):
            assert "data-key" in attrs, text
    for attrs in parser.spans:  # numbers quoted in sentences carry their source too
        assert json.loads(attrs["data-value"]) == resolve(results, attrs["data-key"]), attrs
    ex = results["extractor"]["name"]
    assert ex == "filterbank-v1"
    # every caption names the feature extractor, except the classifier's, which names the classifier, and the
    # per-class FRD's, which names the radiomics features FRD is computed on
    # (FRD needs scikit-image; without it FRD is skipped: tests/test_evaluate_frd.py)
    has_frd = importlib.util.find_spec("skimage") is not None
    rad = results["frd"]["extractor"]
    assert (rad, results["frd"]["features"]) == (("radiomics", 169) if has_frd else (None, None))
    assert parser.captions and all(ex in c or ("classifier" in c.lower() and ex not in c)
                                   or ("FRD" in c and str(rad) in c and ex not in c) for c in parser.captions)
    assert sum(ex not in c for c in parser.captions) == 1 + has_frd
    assert any(ex in c and f"FRD: {rad}" in c for c in parser.captions) == has_frd  # the run table: FID and FRD
    for key in ("metrics/fid", "metrics/frd", "metrics/kid_mean", "metrics/precision", "metrics/recall",
                "classifier_accuracy", "classifier_accuracy_gap_points"):  # the run table shows every run's metrics
        for i in range(len(results["runs"])):
            assert f'data-key="/runs/{i}/{key}"' in page or (key == "metrics/frd" and not has_frd)
    if has_frd:
        assert "Per-class FRD" in page
        assert {a["data-key"] for a in parser.spans} >= {"/frd/rank_agreement_with_fid/runs",
                                                         "/frd/rank_agreement_with_fid/cells"}
    assert 'data-key="/classifier/real_test_accuracy"' in page and "Classifier check" in page
    assert {a["data-key"] for a in parser.spans} >= {"/classifier/real_test_accuracy", "/classifier/n_train"}
    assert "Table 3" in page and "Per-class FID" in page and "Memorization" in page
    assert page.count("data:image/png;base64,") >= 5 and 'src="http' not in page
    assert results["command"].startswith("llcm evaluate --data ")
    assert {"llcm", "torch", "diffusers"} <= set(results["versions"])


def test_results_match_an_independent_recomputation(evaluated, world):
    out, results, _ = evaluated
    data, paths, _ = world
    runs = {r["key"]: r for r in results["runs"]}
    assert sorted(runs) == ["llcm/consistency-1", "llcm/consistency-2", "teacher/ddim-3", "teacher/dpmpp-2"]
    # NFE: consistency = steps; teacher ODE = ((n - 1) * calls/step + 1) * 2 with CFG (default w 6.5)
    assert [runs[k]["nfe"] for k in ("llcm/consistency-2", "teacher/ddim-3", "teacher/dpmpp-2")] == [2, 6, 6]
    assert runs["teacher/ddim-3"]["w"] == 6.5 and runs["llcm/consistency-1"]["w"] == 1.0
    assert runs["llcm/consistency-2"]["timesteps"] == [999, 499]
    ex = get_extractor("filterbank")
    test_rows = [json.loads(line) for line in (data / "test" / "metadata.jsonl").read_text().splitlines()]
    real = extract_features(ex, [data / "test" / r["file_name"] for r in test_rows], progress=False)
    for key in ("teacher/ddim-3", "llcm/consistency-2"):
        files = sorted((out / runs[key]["images_dir"]).rglob("*.png"))
        assert len(files) == runs[key]["n_images"] == 12
        fake = extract_features(ex, files, progress=False)
        assert runs[key]["metrics"]["fid"] == pytest.approx(fid(real, fake), rel=1e-5)
        cls = [f.parent.name for f in files]
        m = np.array([c == "left-blob" for c in cls])
        real_c = real[[r["class"] == "left-blob" for r in test_rows]]
        assert runs[key]["per_class"]["left-blob"]["fid"] == pytest.approx(fid(real_c, fake[m]), rel=1e-5)
    mem = results["memorization"]
    assert mem["n_gen"] == 48 and mem["n_train"] == 48 and not mem["copies_found"]
    assert all(r["seconds_per_image"] > 0 for r in results["runs"])


def test_classifier_accuracy_matches_the_cached_classifier(evaluated, world):
    """results.json's classifier numbers, recomputed from the cached weights and the images on disk."""
    from llcm.evaluation.classifier import Classifier

    out, results, _ = evaluated
    data, _, _ = world
    clf = results["classifier"]
    assert clf["n_train"] == 48 and clf["n_test"] == 32 and clf["epochs"] == 12 and clf["seconds"] > 0
    assert clf["classes"] == sorted(c["name"] for c in results["classes"]) and not clf["missing_from_train"]
    assert results["settings"]["classifier"] is True
    model = Classifier.load(out / clf["cache_file"])
    test_rows = [json.loads(line) for line in (data / "test" / "metadata.jsonl").read_text().splitlines()]
    pred = model.predict([data / "test" / r["file_name"] for r in test_rows])
    hits = [p == r["class"] for p, r in zip(pred, test_rows)]
    assert clf["real_test_accuracy"] == pytest.approx(np.mean(hits))
    assert clf["per_class_real_accuracy"]["top-bar"] == pytest.approx(
        np.mean([h for h, r in zip(hits, test_rows) if r["class"] == "top-bar"]))
    assert clf["real_test_balanced_accuracy"] == pytest.approx(np.mean(list(clf["per_class_real_accuracy"].values())))
    for r in results["runs"]:
        files = sorted((out / r["images_dir"]).rglob("*.png"))
        acc = np.mean([p == f.parent.name for p, f in zip(model.predict(files), files)])
        assert r["classifier_accuracy"] == pytest.approx(acc)
        assert r["classifier_accuracy_gap_points"] == pytest.approx(100 * (clf["real_test_balanced_accuracy"] - acc))
        assert set(r["classifier_per_class_accuracy"]) == set(clf["per_class_real_accuracy"])


def test_rerun_adds_the_classifier_to_a_finished_evaluation(evaluated, world):
    """An evaluation folder made before the classifier check (no classifier in its cache, run.json files without
    it): the same command again generates nothing, keeps every metric and only adds (then reuses) the classifier."""
    out, before, _ = evaluated
    data, paths, _ = world
    for f in (out / "cache").glob("classifier-*"):
        f.unlink()
    run_json = {f: f.read_text() for f in (out / "images").rglob("run.json")}
    assert main(eval_args(data, out, paths)) == 0
    after = json.loads((out / "results.json").read_text())
    assert after["timing"]["generated_this_session"] == 0 and after["timing"]["skipped_existing"] == 48
    assert not after["classifier"]["cached"] and len(list((out / "cache").glob("classifier-*.safetensors"))) == 1
    for a, b in zip(before["runs"], after["runs"]):
        assert a["metrics"] == b["metrics"] and a["classifier_accuracy"] == b["classifier_accuracy"]
    assert {f: f.read_text() for f in run_json} == run_json
    assert main(eval_args(data, out, paths)) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["classifier"]["cached"] and again["classifier"]["seconds"] == after["classifier"]["seconds"]
    assert [r["classifier_accuracy"] for r in again["runs"]] == [r["classifier_accuracy"] for r in after["runs"]]


def test_images_carry_prompt_seed_steps(evaluated):
    out, results, _ = evaluated
    # classes sorted: bottom-bar, left-blob, right-blob (index 2), top-bar; image 2 -> seed 2 * 1e6 + 2
    f = out / "images" / "teacher" / "ddim-3" / "right-blob" / f"{2 * 1_000_000 + 2}.png"
    with Image.open(f) as im:
        meta = dict(im.text)
    assert meta["llcm:prompt"] == "right blob" and meta["llcm:seed"] == "2000002" and meta["llcm:steps"] == "3"
    assert meta["llcm:sampler"] == "ddim" and meta["llcm:model_hash"] == results["runs"][0]["model_hash"]


def test_resume_regenerates_only_missing_images_identically(evaluated, world):
    out, _, _ = evaluated
    data, paths, _ = world
    cfg = eval_config(data, out, paths)
    classes, _ = class_table(cfg.data, "test")
    runs = plan_runs(cfg)
    run = next(r for r in runs if r.key == "llcm/consistency-2")
    victims = [image_path(out, run, classes[c], seed_of(cfg, classes[c], i)) for c, i in ((0, 1), (3, 2))]
    before = [np.asarray(Image.open(v)) for v in victims]
    for v in victims:
        v.unlink()
    stats = generate(cfg, runs, classes)
    assert stats["generated"] == 2 and stats["skipped"] == 4 * 12 - 2
    for v, b in zip(victims, before):
        assert np.abs(np.asarray(Image.open(v)).astype(int) - b).max() <= 1


def test_processes_split_the_work_by_index(world):
    data, paths, root = world
    out = root / "split"
    cfg = dataclasses.replace(eval_config(data, out, paths), models=[parse_model_spec(f"lcm={paths['lcm']}")],
                              steps=(1,))
    classes, _ = class_table(cfg.data, "test")
    runs = plan_runs(cfg)
    first = generate(cfg, runs, classes, process_index=0, num_processes=2)
    assert first["generated"] == 6 and len(list(out.rglob("*.png"))) == 6
    second = generate(cfg, runs, classes, process_index=1, num_processes=2)
    assert second["generated"] == 6 and len(list(out.rglob("*.png"))) == 12
    assert generate(cfg, runs, classes, process_index=1, num_processes=2)["generated"] == 0


def test_a_run_folder_made_differently_is_refused(evaluated, world):
    out, _, _ = evaluated
    data, paths, _ = world
    cfg = eval_config(data, out, paths, w=1.5)
    classes, _ = class_table(cfg.data, "test")
    with pytest.raises(UserError, match="different"):
        generate(cfg, plan_runs(cfg), classes)


def test_model_spec_syntax(tmp_path):
    assert parse_model_spec("t=runs/t/model:ddim@50") == parse_model_spec("t=runs/t/model:ddim@50")
    s = parse_model_spec("t=runs/t/model:dpmpp@10,20")
    assert (s.name, s.path, s.sampler, s.steps) == ("t", "runs/t/model", "dpmpp", (10, 20))
    s = parse_model_spec("llcm=C:/models/llcm")  # a colon that is not a sampler stays in the path
    assert (s.path, s.sampler, s.steps) == ("C:/models/llcm", None, None)
    s = parse_model_spec("llcm=runs/llcm@1,4")
    assert (s.path, s.sampler, s.steps) == ("runs/llcm", None, (1, 4))
    assert parse_model_spec("x=imgs:images").sampler == "images"
    for bad in ("noequals", "=x", "a b=x"):
        with pytest.raises(UserError):
            parse_model_spec(bad)


def test_wrong_sampler_for_a_model_is_a_one_line_error(world, tmp_path, capsys):
    data, paths, _ = world
    rc = main(["evaluate", "--data", str(data), "--out", str(tmp_path / "e"), "--extractor", "filterbank",
               "--model", f"t={paths['teacher']}"])
    assert rc == 2 and "is a teacher" in capsys.readouterr().err
    rc = main(["evaluate", "--data", str(data), "--out", str(tmp_path / "e"), "--extractor", "filterbank",
               "--model", f"c={paths['lcm']}:ddim@4"])
    assert rc == 2 and "consistency model" in capsys.readouterr().err


def test_planted_copy_is_flagged_and_reported(world, tmp_path, capsys):
    """Images read from a folder (no generation): one is a training image, the others fresh noise."""
    data, _, _ = world
    imgs = tmp_path / "imgs" / "1"
    rng = np.random.default_rng(1)
    for name in ("left-blob", "right-blob", "top-bar", "bottom-bar"):
        (imgs / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(imgs / name / f"{i}.png")
    copy = imgs / "top-bar" / "1.png"
    shutil.copy(data / "train" / "top-bar" / "005.png", copy)
    out = tmp_path / "eval"
    rc = main(["evaluate", "--data", str(data), "--out", str(out), "--extractor", "filterbank", "--per-class", "3",
               "--quiet", "--model", f"copies={tmp_path / 'imgs'}:images"])
    assert rc == 0
    assert "warning: memorization: 1 of 12" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    mem = results["memorization"]
    assert mem["copies_found"] and mem["n_flagged"] == 1
    assert (out / mem["flagged_images"][0]["gen_path"]).resolve() == copy.resolve()
    assert mem["flagged_images"][0]["train_path"].endswith("top-bar/005.png")
    assert results["runs"][0]["nfe"] is None and results["runs"][0]["memorization"]["n_flagged"] == 1
    page = (out / "report.html").read_text()
    assert "Possible copies of training images found" in page


def test_sampling_grid_sweep_gives_the_k_ablation(world, tmp_path):
    data, paths, _ = world
    out = tmp_path / "ksweep"
    rc = main(["evaluate", "--data", str(data), "--out", str(out), "--extractor", "filterbank", "--per-class", "2",
               "--steps", "1,4", "--k", "50,100", "--no-memorization", "--no-classifier", "--quiet",
               "--model", f"llcm={paths['llcm']}"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert "classifier" not in results and "classifier_accuracy" not in results["runs"][0]
    assert "--no-classifier" in results["command"]
    ts = {(r["k"], r["steps"]): r["timesteps"] for r in results["runs"]}
    assert ts == {(50, 1): [999], (50, 4): [999, 749, 499, 249], (100, 1): [999], (100, 4): [999, 799, 499, 299]}
    assert (out / "images" / "llcm" / "consistency-4-k50").is_dir()
    page = (out / "report.html").read_text()
    assert "Ablation: consistency sampling grid k" in page and "llcm (k=50)" in page
    assert "Not run (--no-classifier)" in page


def test_two_processes_share_the_generation(evaluated, world, tmp_path):
    """`torchrun`/`accelerate launch` style: 2 processes split the images, process 0 writes the report; the
    images equal those of the one-process run (same seeds)."""
    import os
    import subprocess
    import sys

    out1, _, _ = evaluated
    data, paths, _ = world
    out = tmp_path / "two"
    here = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(here.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "-m", "llcm.cli", "evaluate", "--data", str(data), "--out", str(out),
                          "--extractor", "filterbank", "--steps", "1", "--per-class", "3", "--no-memorization",
                          "--quiet", "--model", f"llcm={paths['llcm']}"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["processes"] == 2 and results["runs"][0]["n_images"] == 12
    assert {json.loads(line)["process"] for f in (out / "images").rglob("timing-*.jsonl")
            for line in f.read_text().splitlines()} == {0, 1}
    for f in sorted((out / "images" / "llcm" / "consistency-1").rglob("*.png")):
        same = out1 / f.relative_to(out)
        assert np.abs(np.asarray(Image.open(f)).astype(int) - np.asarray(Image.open(same))).max() <= 1


def _free_port() -> int:
    """A port nobody listens on: a fixed one clashes when two suites run on one machine."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
