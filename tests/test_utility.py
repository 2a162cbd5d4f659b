"""Train on synthetic, test on real (llcm.evaluation.utility and `llcm evaluate --utility`).

Two well-separated classes drawn here with numpy (a bright disk, horizontal stripes; random positions, sizes,
contrast and noise): real 20 train + 20 test per class, "synthetic" sets drawn independently from the same
generators. A classifier trained on the synthetic set must recognise the real test images; trained on a synthetic
set whose two prompts are exchanged it must get them wrong, so the harness really reads the synthetic labels.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_checks import one_error_line
from llcm.cli import main
from llcm.errors import UserError
from llcm.evaluation.classifier import ClassifierSettings
from llcm.evaluation.report import resolve
from llcm.evaluation.utility import load_rows, plan_utility, utility

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32
DISK, STRIPES = "a bright disk", "horizontal stripes"
FAST = ClassifierSettings(size=SIZE, width=8, batch_size=8)  # 32 px, 8-32 channels: a fraction of a second
EPOCHS = 10


def disk(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    r = rng.uniform(4, 9)
    cy, cx = rng.uniform(r, SIZE - r, 2)
    img = 0.15 + rng.uniform(0.5, 0.8) * (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r)
    return img + rng.normal(0, 0.05, img.shape)


def stripes(rng: np.random.Generator) -> np.ndarray:
    yy = np.mgrid[:SIZE, :SIZE][0]
    period, phase = rng.uniform(4, 8), rng.uniform(0, 2 * np.pi)
    img = 0.45 + rng.uniform(0.2, 0.35) * np.sin(2 * np.pi * yy / period + phase)
    return img + rng.normal(0, 0.05, img.shape)


def u8(img: np.ndarray) -> np.ndarray:
    return (img.clip(0, 1) * 255).round().astype(np.uint8)


def write_split(root: Path, split: str, n: int, seed: int, swap: bool = False, grey: bool = False,
                extra: dict | None = None) -> Path:
    """root/split/<class>/<i>.png + metadata.jsonl (file_name, text, class); swap: each image gets the other
    class's prompt and class."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, text, draw in (("disk", DISK, disk), ("stripes", STRIPES, stripes)):
        label, label_text = (("stripes", STRIPES) if name == "disk" else ("disk", DISK)) if swap else (name, text)
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = u8(draw(rng))
            Image.fromarray(img if grey else np.stack([img] * 3, -1)).save(root / split / name / f"{i:03d}.png")
            rows.append({"file_name": f"{name}/{i:03d}.png", "text": label_text, "class": label, **(extra or {})})
    (root / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("utility")
    real = write_split(write_split(root / "real", "train", 20, seed=1), "test", 20, seed=2)
    synth_extra = {"seed": 0, "steps": 4, "w": 7.0, "model_hash": "abc", "synthetic": True}
    synth = write_split(root / "synth", "train", 25, seed=3, grey=True, extra=synth_extra)  # more than needed
    swapped = write_split(root / "swapped", "train", 20, seed=4, swap=True)
    return real, synth, swapped, root


def test_synthetic_images_teach_the_real_classes_and_their_labels_are_used(sets):
    real, synth, swapped, _ = sets
    res = utility(real, synth, seeds=(0, 1), epochs=EPOCHS, progress=False, settings=FAST)
    rows = res["rows"]
    assert list(rows) == ["real", "synthetic", "real+synthetic"]
    for name in rows:
        assert min(rows[name]["mean_accuracy"]["per_seed"]) >= 0.8, (name, rows[name]["mean_accuracy"])
    # the same count per class as the real train split: the first 20 of the 25 synthetic images of each class
    assert rows["synthetic"]["train_images"] == rows["real"]["train_images"] == {DISK: 20, STRIPES: 20}
    assert rows["real+synthetic"]["train_images"] == {DISK: 40, STRIPES: 40}
    assert [c["synthetic_used"] for c in res["classes"]] == [20, 20] and not res["synthetic_short"]
    assert [c["synthetic_available"] for c in res["classes"]] == [25, 25]
    m = rows["synthetic"]["mean_accuracy"]
    assert m["mean"] == pytest.approx(np.mean(m["per_seed"])) and m["std"] == pytest.approx(np.std(m["per_seed"],
                                                                                                      ddof=1))
    pc = rows["synthetic"]["per_class"]
    assert set(pc) == {DISK, STRIPES}
    assert m["per_seed"][0] == pytest.approx((pc[DISK]["per_seed"][0] + pc[STRIPES]["per_seed"][0]) / 2)
    assert res["format"] == "llcm-utility-v1" and res["n_test"] == 40 and res["settings"]["seeds"] == [0, 1]
    assert res["synthetic_source"]["marked_synthetic"] == 50 and res["synthetic_source"]["model_hash"] == ["abc"]
    json.dumps(res)  # JSON-serialisable as it is
    assert str(real) not in json.dumps(res)  # no absolute path of this machine

    again = utility(real, synth, seeds=(1,), epochs=EPOCHS, progress=False, settings=FAST)
    assert again["rows"]["synthetic"]["mean_accuracy"]["per_seed"] == [m["per_seed"][1]]  # deterministic per seed

    flipped = utility(real, swapped, seeds=(0, 1), epochs=EPOCHS, progress=False, settings=FAST)
    assert max(flipped["rows"]["synthetic"]["mean_accuracy"]["per_seed"]) <= 0.2
    assert flipped["rows"]["real"] == {**rows["real"], "train_seconds": flipped["rows"]["real"]["train_seconds"]}


def test_fewer_synthetic_images_are_all_used_and_recorded(sets):
    real, _, _, root = sets
    few = write_split(root / "few", "train", 7, seed=5)
    plan = plan_utility(real, few)
    assert [(c["text"], c["real_train"], c["synthetic_used"]) for c in plan.classes] == [(DISK, 20, 7),
                                                                                          (STRIPES, 20, 7)]
    res = utility(real, few, seeds=(0,), epochs=1, progress=False, settings=FAST)
    assert res["rows"]["synthetic"]["train_images"] == {DISK: 7, STRIPES: 7}
    assert res["synthetic_short"] == {DISK: [20, 7], STRIPES: [20, 7]}
    assert res["rows"]["synthetic"]["mean_accuracy"]["std"] is None  # one seed: no spread


def test_classes_are_matched_by_prompt_and_unmatched_ones_are_listed(sets):
    real, _, _, root = sets
    other = root / "other" / "train"
    write_split(root / "other", "train", 3, seed=6)
    rows = [json.loads(line) for line in (other / "metadata.jsonl").read_text().splitlines()]
    for r in rows[:3]:  # the disks renamed: another prompt, and another class name for the stripes
        r["text"] = "a dark square"
    for r in rows[3:]:
        r["class"] = "lines"
    (other / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="only one class in common"):
        plan_utility(real, root / "other")
    for r in rows[3:]:
        r["text"] = "vertical bars"
    (other / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="no class in common") as err:
        plan_utility(real, root / "other")
    assert "\n" not in str(err.value) and "'a dark square'" in str(err.value)
    with pytest.raises(UserError, match="no train/metadata.jsonl"):
        plan_utility(real, root)


def test_dicom_nifti_and_grey_files_are_read(tmp_path):
    """A synthetic set may hold DICOM and NIfTI slices (read by llcm.data.readers) and one NIfTI volume per class
    whose rows name a `slice`."""
    import nibabel as nib
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    rng = np.random.default_rng(0)
    imgs = [u8(disk(rng)) for _ in range(4)]
    d = tmp_path / "train"
    d.mkdir()
    Image.fromarray(imgs[0], "L").save(d / "a.png")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta, SecondaryCaptureImageStorage, "1.2.3", "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = SIZE, SIZE, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = imgs[1].tobytes()
    ds.save_as(d / "b.dcm", enforce_file_format=True)
    # readers show a RAS+ slice with anterior up (np.rot90 of the stored array): store the inverse rotation
    nib.save(nib.Nifti1Image(np.rot90(imgs[2], -1)[:, :, None].astype(np.float32), np.eye(4)), d / "c.nii.gz")
    vol = np.stack([np.rot90(im, -1) for im in (imgs[3], imgs[0])], -1).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), d / "v.nii.gz")
    rows = [{"path": str(d / f)} for f in ("a.png", "b.dcm", "c.nii.gz")]
    rows += [{"path": str(d / "v.nii.gz"), "slice": 0}, {"path": str(d / "v.nii.gz"), "slice": 1}]
    got = load_rows(rows, SIZE)
    assert got.shape == (5, SIZE, SIZE, 3) and (got[..., 0] == got[..., 2]).all()
    for g, want in zip(got, [imgs[0], imgs[1], imgs[2], imgs[3], imgs[0]]):
        # NIfTI intensities are rescaled per volume (percentiles): compare shapes of the pictures, not levels
        assert np.corrcoef(g[..., 0].ravel().astype(float), want.ravel().astype(float))[0, 1] > 0.97
    assert np.array_equal(got[0, ..., 0], imgs[0]) and np.array_equal(got[1, ..., 0], imgs[1])
    with pytest.raises(UserError, match="slices"):
        load_rows([{"path": str(d / "v.nii.gz")}], SIZE)


class Spans(HTMLParser):
    """The attributes of every number (a <td> or <span> with a data-key) of a page."""

    def __init__(self):
        super().__init__()
        self.found = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("td", "span") and "data-value" in a:
            self.found.append(a)


def test_cli_utility_alone_writes_results_and_the_report(sets, tmp_path, capsys):
    real, synth, _, _ = sets
    out = tmp_path / "eval"
    rc = main(["evaluate", "--data", str(real), "--out", str(out), "--utility", str(synth), "--utility-seeds", "2",
               "--classifier-epochs", "3", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "real+synthetic" in printed and "report:" in printed
    results = json.loads((out / "results.json").read_text())
    u = results["utility"]
    assert u["format"] == "llcm-utility-v1" and list(u["rows"]) == ["real", "synthetic", "real+synthetic"]
    assert u["settings"]["seeds"] == [0, 1] and u["settings"]["epochs"] == 3
    assert "--utility" in results["command"] and "runs" not in results
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Train on synthetic, test on real" in page
    spans = Spans()
    spans.feed(page)
    assert len(spans.found) >= 3 * 3 * 2
    for attrs in spans.found:  # every number in the utility's tables carries its value's place in results.json
        assert json.loads(attrs["data-value"]) == resolve(results, attrs["data-key"]), attrs
    for name in u["rows"]:  # every row's mean and std, overall and per class
        assert f'data-key="/utility/rows/{name}/mean_accuracy/mean"' in page
        assert f'data-key="/utility/rows/{name}/mean_accuracy/std"' in page
        assert f'data-key="/utility/rows/{name}/per_class/{STRIPES}/mean"' in page
    assert str(real) not in json.dumps(u) and str(synth) not in json.dumps(u)  # names, not paths of this machine


def test_cli_errors_are_one_line(sets, tmp_path, capsys):
    real, _, _, root = sets
    empty = tmp_path / "not-a-dataset"
    empty.mkdir()
    rc = main(["evaluate", "--data", str(real), "--out", str(tmp_path / "e"), "--utility", str(empty), "--quiet"])
    assert rc == 2 and "no train/metadata.jsonl" in one_error_line(capsys)
    rc = main(["evaluate", "--data", str(real), "--out", str(tmp_path / "e"), "--quiet"])  # neither --model nor it
    assert rc == 2 and "--model" in one_error_line(capsys)
    rc = main(["evaluate", "--data", str(real), "--out", str(tmp_path / "e"), "--utility", str(root / "synth"),
               "--utility-seeds", "0", "--quiet"])
    assert rc == 2 and "--utility-seeds" in one_error_line(capsys)


def test_utility_next_to_a_model_run(sets, tmp_path):
    """With --model (here images made elsewhere: nothing generated), results.json keeps every run and adds the
    utility; the report shows both."""
    real, synth, _, _ = sets
    imgs = tmp_path / "imgs" / "1"
    rng = np.random.default_rng(7)
    for name, draw in (("disk", disk), ("stripes", stripes)):
        (imgs / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(u8(draw(rng))).save(imgs / name / f"{i}.png")
    out = tmp_path / "eval"
    rc = main(["evaluate", "--data", str(real), "--out", str(out), "--extractor", "filterbank", "--per-class", "4",
               "--no-memorization", "--classifier-epochs", "2", "--utility", str(synth), "--utility-seeds", "1",
               "--quiet", "--model", f"made={tmp_path / 'imgs'}:images"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["runs"][0]["n_images"] == 8 and results["classifier"]["n_train"] == 40
    assert results["utility"]["settings"]["seeds"] == [0] and results["settings"]["utility_seeds"] == 1
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Train on synthetic, test on real" in page and "Table 3" in page
