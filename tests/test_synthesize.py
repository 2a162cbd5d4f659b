"""`llcm synthesize`: layout read back, colour modes, determinism, resume, memorization filter, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_checks import one_error_line
from llcm.cli import main

MRI, FUNDUS = "brain-mri-axial-t1", "fundus-normal"


def run(out: Path, *extra: str, classes=(MRI, FUNDUS), per_class: int = 3) -> int:
    return main(["synthesize", "--model", "default", "--per-class", str(per_class), "--classes", *classes,
                 "--batch", "2", "--quiet", "--out", str(out), *extra])


def dataset_files(out: Path) -> dict[str, bytes]:
    """Every file of the dataset (the resume journal aside)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".synthesize" not in p.parts}


@pytest.fixture(scope="module")
def made(tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("synth") / "a"
    assert run(out) == 0
    return out


def test_layout_is_a_dataset_llcms_loader_reads(made):
    from llcm.vae import load_pixels, scan_split

    rows = [json.loads(x) for x in (made / "train" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    mri = [r for r in rows if r["class"] == MRI]
    assert [r["seed"] for r in mri] == [0, 1, 2]  # class 0 of the default model: seeds 0, 1, 2
    fundus = [r for r in rows if r["class"] == FUNDUS]
    assert [r["seed"] for r in fundus] == [6_000_000, 6_000_001, 6_000_002]  # class 6: seed 6 * 1e6 + i
    for r in rows:
        assert r["synthetic"] is True and r["steps"] == 4 and r["w"] == 7.0 and len(r["model_hash"]) == 12
        assert r["modality"] in ("MRI", "fundus photograph") and r["text"]
    split = scan_split(made, "train")  # what `llcm encode` reads
    assert len(split) == 6 and split.height == 64
    assert load_pixels(split, [0]).shape == (1, 3, 64, 64)
    stats = json.loads((made / "stats.json").read_text())
    assert stats["classes"][MRI]["train"] == 3 and stats["classes"][MRI]["grayscale"] is True
    assert stats["classes"][FUNDUS]["grayscale"] is False
    card = (made / "card.md").read_text()
    assert "synthetic" in card and "Model card" in card  # the default model's own card is carried along


def test_grayscale_classes_are_single_channel_and_equal_llcm_generate(made, tmp_path, one_torch_thread):
    assert Image.open(made / "train" / MRI / "000001.png").mode == "L"
    assert Image.open(made / "train" / FUNDUS / "000001.png").mode == "RGB"
    assert main(["generate", "axial brain MRI, T1-weighted", "--model", "default", "--seed", "1",
                 "--out", str(tmp_path / "g")]) == 0
    generated = np.asarray(Image.open(tmp_path / "g" / "000_seed1.png").convert("L")).astype(int)
    diff = np.abs(generated - np.asarray(Image.open(made / "train" / MRI / "000001.png")).astype(int))
    # the same image: a batch of 2 against a batch of 1 moves a float by ~1e-5, so at most one grey level
    # on a few pixels (measured: 0.03% of them)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_rerun_is_byte_identical_and_resumes_after_an_interruption(made, tmp_path, monkeypatch, one_torch_thread):
    import llcm.synthesize as synth

    # the same settings in the same folder: nothing to do, nothing changes
    before = dataset_files(made)
    assert run(made) == 0
    assert dataset_files(made) == before
    # interrupted after its second batch (as a kill would leave it: files of a third batch half-written)
    out = tmp_path / "b"
    calls = {"n": 0}
    real_append = synth._append

    def append_then_die(folder, entry):
        real_append(folder, entry)
        calls["n"] += 1
        if calls["n"] == 2:
            (folder / "train" / FUNDUS).mkdir(parents=True, exist_ok=True)
            (folder / "train" / FUNDUS / ".000000.png.123.tmp").write_bytes(b"half")
            raise KeyboardInterrupt

    monkeypatch.setattr(synth, "_append", append_then_die)
    assert run(out) == 130
    assert not (out / "train" / "metadata.jsonl").exists()
    monkeypatch.setattr(synth, "_append", real_append)
    assert run(out) == 0
    assert dataset_files(out).keys() - {f"train/{FUNDUS}/.000000.png.123.tmp"} == before.keys()
    assert all(dataset_files(out)[k] == v for k, v in before.items())


def test_a_killed_run_resumes_to_the_same_bytes(tmp_path, one_torch_thread):
    """SIGKILL in the middle of a run (a real process, killed once a few batches are journaled), then the same
    command again: the dataset equals one made in a single go."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out, clean = tmp_path / "killed", tmp_path / "clean"
    args = ["--model", "default", "--per-class", "24", "--classes", MRI, FUNDUS, "--batch", "2", "--quiet",
            "--workers", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "llcm.cli", "synthesize", *args, "--out", str(out)], env=env)
    journal = out / ".synthesize" / "journal.jsonl"
    deadline = time.monotonic() + 300  # only a guard against a hung test; the kill waits for the journal
    while proc.poll() is None and time.monotonic() < deadline:
        if journal.is_file() and len(journal.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "train" / "metadata.jsonl").exists()
    assert main(["synthesize", *args, "--out", str(out)]) == 0
    assert main(["synthesize", *args, "--out", str(clean)]) == 0
    files = dataset_files(out)
    assert {k for k in files if "/." not in k} == set(dataset_files(clean))  # a torn temporary file may remain
    assert all(files[k] == v for k, v in dataset_files(clean).items())


def test_worker_processes_write_the_same_bytes(made, tmp_path):
    out = tmp_path / "parallel"
    assert run(out, "--workers", "2") == 0
    assert dataset_files(out) == dataset_files(made)


def test_memorized_samples_are_redrawn_with_the_next_seeds(made, tmp_path, one_torch_thread):
    """A 'training set' made of the model's own samples for seeds 0-5: those seeds are copies, flagged and
    redrawn; the class still gets its images, from seeds 6, 7, 8."""
    train = tmp_path / "train-set"
    assert run(train, classes=(MRI,), per_class=6) == 0
    out = tmp_path / "checked"
    assert run(out, "--filter-memorized", "--data", str(train), classes=(MRI,)) == 0
    rows = [json.loads(x) for x in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [6, 7, 8]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["classes"][MRI]["memorized_redrawn"] == 6 and stats["classes"][MRI]["train"] == 3


def test_bad_input_gives_one_line_and_writes_nothing(made, tmp_path, capsys):
    out = tmp_path / "x"
    for extra, classes, per_class, needle in (([], ("no-such-class",), 3, "unknown class"),
                                              ([], (MRI,), 0, "--per-class"),
                                              (["--stack"], (MRI,), 3, "--stack"),
                                              (["--filter-memorized"], (MRI,), 3, "--data")):
        assert run(out, *extra, classes=classes, per_class=per_class) == 2
        assert needle in one_error_line(capsys)
        assert not out.exists()
    # a folder that holds another dataset, or this one made with other settings: refused, untouched
    other = tmp_path / "built"
    (other / "train").mkdir(parents=True)
    (other / "build.json").write_text("{}")
    assert run(other) == 2
    assert "another dataset" in one_error_line(capsys)
    assert sorted(p.name for p in other.rglob("*")) == ["build.json", "train"]
    before = dataset_files(made)
    assert run(made, "--steps", "2") == 2
    assert "other settings" in one_error_line(capsys)
    assert dataset_files(made) == before


def test_dicom_and_nifti_files_hold_the_images_and_no_identity(made, tmp_path, capsys, one_torch_thread):
    import nibabel as nib
    import pydicom

    out = tmp_path / "dcm"
    assert run(out, "--format", "dicom", per_class=2) == 0
    png = np.asarray(Image.open(made / "train" / FUNDUS / "000001.png"))
    ds = pydicom.dcmread(out / "train" / FUNDUS / "000001.dcm")
    assert np.array_equal(ds.pixel_array, png)  # the same image as the PNG run (same batch boundaries)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert str(ds.PatientName) == "SYNTHETIC" and ds.PatientID == "SYNTHETIC" and ds.BurnedInAnnotation == "NO"
    assert ds.Modality == "OP" and ds.PhotometricInterpretation == "RGB"
    assert "seed 6000001" in ds.ImageComments and "3c9c3f997f7a" in ds.ImageComments
    assert not [e for e in ds.iterall() if e.VR in ("DA", "DT", "TM") and e.value]
    mri = pydicom.dcmread(out / "train" / MRI / "000000.dcm")
    assert mri.Modality == "MR" and mri.PhotometricInterpretation == "MONOCHROME2" and mri.SamplesPerPixel == 1
    assert mri.SOPInstanceUID != ds.SOPInstanceUID
    # NIfTI: one volume per class with --stack; a colour class cannot be NIfTI
    nii = tmp_path / "nii"
    assert run(nii, "--format", "nifti", "--stack", classes=(MRI,)) == 0
    volume = nib.load(nii / "train" / MRI / f"{MRI}.nii.gz")
    assert volume.shape == (64, 64, 3) and np.array_equal(volume.affine, np.eye(4))
    rows = [json.loads(x) for x in (nii / "train" / "metadata.jsonl").read_text().splitlines()]
    assert [r["slice"] for r in rows] == [0, 1, 2] and {r["file_name"] for r in rows} == {f"{MRI}/{MRI}.nii.gz"}
    assert run(tmp_path / "rgb", "--format", "nifti") == 2
    assert "grayscale images only" in one_error_line(capsys)


def test_hugging_face_imagefolder_reads_it(made, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    ds = load_dataset("imagefolder", data_dir=str(made), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 6 and {"image", "text", "class", "seed", "synthetic", "model_hash"} <= set(ds.column_names)
    first = ds[0]
    assert first["synthetic"] is True and first["image"].size == (64, 64)
    assert {ds[i]["image"].mode for i in range(6)} == {"L", "RGB"}


def test_dtype_bf16_gives_llcm_generates_bf16_images_and_is_a_setting(made, tmp_path, capsys, one_torch_thread):
    """--dtype bf16 samples with every network cast, as `llcm generate --dtype bf16` does: the same image (up to
    the batch), not the fp32 one; recorded in the settings, rows and card; a resume in another dtype is refused."""
    out = tmp_path / "bf"
    assert run(out, "--dtype", "bf16", classes=(MRI,), per_class=2) == 0
    rows = [json.loads(x) for x in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    assert [r["dtype"] for r in rows] == ["bf16", "bf16"]
    assert json.loads((out / "stats.json").read_text())["settings"]["dtype"] == "bf16"
    assert "networks in bf16" in (out / "card.md").read_text()
    assert json.loads((made / "train" / "metadata.jsonl").read_text().splitlines()[0])["dtype"] == "fp32"
    assert main(["generate", "axial brain MRI, T1-weighted", "--model", "default", "--seed", "1", "--dtype", "bf16",
                 "--out", str(tmp_path / "g")]) == 0
    generated = np.asarray(Image.open(tmp_path / "g" / "000_seed1.png").convert("L")).astype(int)
    bf16 = np.asarray(Image.open(out / "train" / MRI / "000001.png")).astype(int)
    fp32 = np.asarray(Image.open(made / "train" / MRI / "000001.png")).astype(int)
    assert np.abs(generated - bf16).max() <= 2  # bf16 rounds more than fp32 when the batch changes
    assert np.abs(fp32 - bf16).max() > 2  # another precision: not the fp32 image
    before = dataset_files(out)
    assert run(out, classes=(MRI,), per_class=2) == 2  # fp32 over a bf16 run
    assert "dtype 'bf16' -> 'fp32'" in one_error_line(capsys)
    assert dataset_files(out) == before
    # a run journaled before --dtype existed (no dtype in its settings) was fp32 and resumes as such
    state = out / ".synthesize" / "state.json"
    old = json.loads(state.read_text())
    del old["settings"]["dtype"]
    state.write_text(json.dumps(old))
    assert run(out, "--dtype", "bf16", classes=(MRI,), per_class=2) == 2
    assert "dtype 'fp32' -> 'bf16'" in one_error_line(capsys)
    assert run(out, classes=(MRI,), per_class=2) == 0
