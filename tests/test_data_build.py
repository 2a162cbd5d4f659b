"""End-to-end tests of `llcm data build` on a generated hostile source tree.

The tree holds corrupt, truncated and empty files, a text file named .jpg, 16-bit PNGs and TIFFs,
DICOM with and without patient identifiers (and a folder named after a patient ID), an
undecodable compressed DICOM, a NIfTI volume with empty slices, a CSV label file, nested split
folders, duplicates within and across two sources, and a zip with a `../` member and a symlink.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llcm.data import build_dataset, read_split
from llcm.data.build import CRASH_ENV

SRC_DIR = Path(__file__).resolve().parents[1] / "src"
PHI = ["Doe^Jane", "PID778899", "19700101", "20240102", "ACC12345", "House^Gregory"]
PHI_NEEDLES = [b"jane", b"pid778899", b"19700101", b"20240102", b"acc12345", b"gregory"]
OPTIONS = dict(size=64, cap=3, seed=0, holdout=("hospital-a/derm/*",), workers=1, progress=False)


def pattern(seed: int, size: int = 96) -> np.ndarray:
    """A distinct smooth uint8 picture per seed (random Gaussian blobs plus faint noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size))
    for _ in range(6):
        cx, cy, s, a = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.25), rng.uniform(-1, 1)
        img += a * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    img += rng.normal(0, 0.02, img.shape)
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).astype(np.uint8)


def save(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def dicom(path: Path, *, phi: bool = False, frames: int = 1, seed: int = 0, monochrome1: bool = False,
          transfer_syntax: str | None = None, pixels: bool = True, burned_in: bool = False,
          patient_id: str = "") -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.1394.9.{seed}"
    meta.TransferSyntaxUID = UID(transfer_syntax) if transfer_syntax else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined = "CT", "HEAD"
    if phi:
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PHI[0], PHI[1], PHI[2]
        ds.StudyDate, ds.AccessionNumber, ds.ReferringPhysicianName = PHI[3], PHI[4], PHI[5]
        ds.InstitutionName = "General Hospital"
    if patient_id:
        ds.PatientID = patient_id
    if burned_in:
        ds.BurnedInAnnotation = "YES"
    if pixels:
        ds.Rows, ds.Columns = 80, 80
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.WindowCenter, ds.WindowWidth = 40, 400
        if frames > 1:
            ds.NumberOfFrames = frames
        stack = [pattern(seed + f, 80).astype(np.float64) / 255 * 400 - 160 + 1024 for f in range(frames)]
        raw = np.stack(stack).astype("<u2").tobytes()
        if transfer_syntax:
            ds.PixelData = encapsulate([b"\x00\x01\x02 not an mpeg stream" * 4])
            ds["PixelData"].VR = "OB"
        else:
            ds.PixelData = raw
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def nifti(path: Path) -> Path:
    import nibabel as nib

    vol = np.zeros((80, 80, 8), np.float32)
    for k in range(1, 7):  # slices 0 and 7 stay empty
        vol[:, :, k] = pattern(60 + k, 80).astype(np.float32) + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
    return path


def make_hostile(root: Path) -> list[str]:
    """Write the two folder sources and the zip; returns the source arguments."""
    a = root / "hospital-a"
    cx = a / "chest_xray"
    (cx / "README.txt").parent.mkdir(parents=True)
    (cx / "README.txt").write_text("Chest X-ray images, see the paper.\n")
    for i in range(4):
        save(cx / "train" / "NORMAL" / f"n{i}.png", pattern(i))
    save(cx / "val" / "NORMAL" / "n4.png", pattern(4))
    save(cx / "train" / "NORMAL" / "n0_copy.bmp", pattern(0))  # exact duplicate (same pixels, other format)
    save(cx / "train" / "NORMAL" / "n1_q90.jpg", pattern(1), quality=90)  # near duplicate
    good = io.BytesIO()
    Image.fromarray(pattern(5)).save(good, "JPEG", quality=95)
    (cx / "train" / "NORMAL" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (cx / "train" / "NORMAL" / "notes.jpg").write_text("this is not a picture\n")
    (cx / "train" / "NORMAL" / "empty.png").write_bytes(b"")
    save(cx / "train" / "NORMAL" / "tiny.png", pattern(6, 20))
    save(cx / "train" / "NORMAL" / "blank.png", np.full((96, 96), 128, np.uint8))
    for i in range(3):
        save(cx / "train" / "PNEUMONIA" / f"p{i}.jpg", pattern(10 + i), quality=95)
    save(cx / "test" / "PNEUMONIA" / "p3.jpg", pattern(13), quality=95)
    frames = [Image.fromarray(pattern(14)).convert("P"), Image.fromarray(pattern(99)).convert("P")]
    frames[0].save(cx / "test" / "PNEUMONIA" / "p4.gif", save_all=True, append_images=frames[1:])
    # 16-bit radiographs: 12-bit values in 16-bit PNGs and a 16-bit TIFF
    for i in range(2):
        save(a / "bone" / "fracture" / f"f{i}.png", (pattern(20 + i).astype(np.uint16) * 16))
    save(a / "bone" / "fracture" / "f2.tif", (pattern(22).astype(np.uint16) * 256))
    hd = a / "head_ct" / "haemorrhage"
    dicom(hd / "phi.dcm", phi=True, seed=30)
    dicom(hd / "clean.dcm", seed=31)
    dicom(hd / "multi.dcm", frames=2, seed=32)
    dicom(hd / "mono1.dcm", monochrome1=True, seed=34)
    dicom(hd / "mpeg.dcm", transfer_syntax="1.2.840.10008.1.2.4.100", seed=35)
    dicom(hd / "report.dcm", pixels=False, seed=36)
    dicom(hd / "burned.dcm", burned_in=True, seed=37)
    dicom(a / "head_ct" / "PID778899" / "ct.dcm", phi=True, seed=38)  # a folder named after the patient
    nifti(a / "brain_mri" / "t1" / "vol.nii.gz")
    for i in range(3):
        save(a / "derm" / f"d{i + 1}.png", pattern(40 + i))
    (a / "derm" / "labels.csv").write_text("image_id,dx\nd1,mel\nd2,nv\nd3,mel\nmissing,nv\n")
    save(a / "stray.png", pattern(45))  # no class folder, no label file
    b = root / "hospital-b"
    (b / "chest_xray" / "PNEUMONIA").mkdir(parents=True)
    (b / "chest_xray" / "PNEUMONIA" / "p0.jpg").write_bytes((cx / "train" / "PNEUMONIA" / "p0.jpg").read_bytes())
    save(b / "chest_xray" / "PNEUMONIA" / "n2_big.png", np.asarray(Image.fromarray(pattern(2)).resize((128, 128))))
    for i in range(2):
        save(b / "chest_xray" / "PNEUMONIA" / f"b{i}.png", pattern(50 + i))
    zpath = root / "knee_archive.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(pattern(70 + i)).save(buf, "PNG")
            zf.writestr(f"knee/osteoarthritis/k{i}.png", buf.getvalue())
        buf = io.BytesIO()
        Image.fromarray(pattern(80)).save(buf, "PNG")
        zf.writestr("../evil.png", buf.getvalue())
        link = zipfile.ZipInfo("knee/osteoarthritis/link.png")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "../../../../etc/passwd")
    return [str(a), str(b), str(zpath)]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    srcs = make_hostile(root / "sources")
    before = tree_digest(root / "sources")
    out = root / "out"
    stats = build_dataset(srcs, out, **OPTIONS)
    return {"root": root, "srcs": srcs, "before": before, "out": out, "stats": stats}


# class -> (train, test) with cap 3, derm held out and the paper's rule (--test-fraction 0) ...
EXPECTED_CAP_RULE = {
    "hospital-a/chest-xray/normal": (3, 2),
    "hospital-a/chest-xray/pneumonia": (3, 2),
    "hospital-a/bone/fracture": (3, 0),
    "hospital-a/head-ct/haemorrhage": (3, 2),
    "hospital-a/brain-mri/t1": (3, 3),
    "hospital-a/derm/mel": (0, 2),
    "hospital-a/derm/nv": (0, 1),
    "hospital-b/chest-xray/pneumonia": (2, 0),
    "knee-archive/knee/osteoarthritis": (3, 0),
}
# ... and with the default --test-fraction 0.1: every class of two or more has a test image
EXPECTED_CLASSES = dict(EXPECTED_CAP_RULE, **{
    "hospital-a/bone/fracture": (2, 1),
    "hospital-b/chest-xray/pneumonia": (1, 1),
    "knee-archive/knee/osteoarthritis": (2, 1),
})
EXPECTED_REJECTIONS = {
    "blank": 1,
    "dicom_burned_in_annotation": 1,
    "dicom_compressed_undecodable": 1,
    "dicom_no_pixels": 1,
    "empty_slice": 2,
    "exact_duplicate": 2,
    "label_contains_phi": 1,
    "near_duplicate": 2,
    "no_label": 1,
    "not_an_image": 1,
    "too_small": 1,
    "unreadable": 2,
    "unsafe_archive_member": 2,
}


def test_exact_counts_per_class_and_reason(hostile):
    stats = hostile["stats"]
    got = {c: (v["train"], v["test"]) for c, v in stats["classes"].items()}
    assert got == EXPECTED_CLASSES
    assert stats["rejections"] == EXPECTED_REJECTIONS
    assert stats["duplicates"] == {"exact": 2, "near": 2, "cross_source": 2, "class_conflicts": 2}
    assert stats["totals"]["train"] == 17 and stats["totals"]["test"] == 15
    src_a = stats["sources"][0]
    assert src_a["ignored_files"] == {".txt": 1} and src_a["label_files"] == 1 and src_a["label_rows_without_file"] == 1
    assert stats["held_out_classes"] == ["hospital-a/derm/mel", "hospital-a/derm/nv"]
    assert stats["classes"]["hospital-a/chest-xray/pneumonia"]["prompt"] == "chest X-ray, pneumonia"
    assert stats["classes"]["hospital-a/brain-mri/t1"]["modality"] == "MRI"


def test_output_layout_metadata_and_card(hostile):
    out = hostile["out"]
    assert sorted(p.name for p in out.iterdir()) == ["build.json", "card.md", "stats.json", "test", "train"]
    for split in ("train", "test"):
        rows = read_split(out, split)
        assert rows == sorted(rows, key=lambda r: r["file_name"])
        for row in rows:
            assert {"file_name", "text", "class", "species", "body_part", "disease", "condition", "modality",
                    "source", "licence", "content_hash"} <= set(row)
            with Image.open(row["path"]) as im:
                assert im.size == (64, 64) and im.mode == "RGB" and im.format == "JPEG"
                assert not im.info.get("exif")
    train = read_split(out, "train")
    ct = [r for r in train if r["class"] == "hospital-a/head-ct/haemorrhage"]
    assert {r["dicom_modality"] for r in ct} == {"CT"} and {r["dicom_body_part"] for r in ct} == {"HEAD"}
    card = (out / "card.md").read_text()
    assert "| hospital-a/chest-xray/normal | X-ray | chest | normal | 3 | 2 | chest X-ray, normal |" in card
    assert "`unsafe_archive_member` | 2 |" in card and "`label_contains_phi` | 1 |" in card
    fracture = [r for r in train if r["class"] == "hospital-a/bone/fracture"]
    for r in fracture:  # 12-bit data in 16-bit PNGs keeps its contrast (a >> 8 would make it black)
        assert np.asarray(Image.open(r["path"])).mean() > 40


def test_no_phi_anywhere_in_output(hostile, tmp_path):
    out = hostile["out"]
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes().lower()
            for needle in PHI_NEEDLES:
                assert needle not in data, (path, needle)
    # the cache (journal, objects) never holds identifiers either
    cached = tmp_path / "cached"
    build_dataset(hostile["srcs"], cached, **OPTIONS, keep_cache=True)
    journal = (cached / ".llcm-build" / "journal.jsonl").read_text().splitlines()
    assert journal and all("phi" not in json.loads(line) for line in journal)  # not even hashes on disk
    for path in cached.rglob("*"):
        if path.is_file():
            data = path.read_bytes().lower()
            assert not any(n in data for n in PHI_NEEDLES), path


def test_sources_unchanged_and_archive_contained(hostile):
    assert tree_digest(hostile["root"] / "sources") == hostile["before"]
    assert not (hostile["root"] / "evil.png").exists()
    assert not list(hostile["root"].rglob("evil.png"))


def test_rerun_is_up_to_date_and_rebuild_is_byte_identical(hostile, tmp_path):
    out = hostile["out"]
    ref = tree_bytes(out)
    again = build_dataset(hostile["srcs"], out, **OPTIONS)
    assert again["run"]["up_to_date"] and tree_bytes(out) == ref
    forced = build_dataset(hostile["srcs"], out, **dict(OPTIONS, force=True))
    assert not forced["run"]["up_to_date"] and tree_bytes(out) == ref
    other = tmp_path / "elsewhere"
    build_dataset(hostile["srcs"], other, **OPTIONS)
    assert tree_bytes(other) == ref


def test_parallel_decoding_gives_the_same_bytes(hostile, tmp_path):
    par = tmp_path / "parallel"
    stats = build_dataset(hostile["srcs"], par, **dict(OPTIONS, workers=2))
    assert stats["run"]["decoded_files"] == stats["totals"]["files"]
    assert tree_bytes(par) == tree_bytes(hostile["out"])


def _build_in_subprocess(srcs, out, crash_after: int) -> int:
    code = ("import json, sys; from llcm.data import build_dataset; "
            "o = json.loads(sys.argv[1]); o['holdout'] = tuple(o['holdout']); "
            "build_dataset(sys.argv[2:-1], sys.argv[-1], **o)")
    env = dict(os.environ, PYTHONPATH=str(SRC_DIR), **{CRASH_ENV: str(crash_after)})
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(OPTIONS), *srcs, str(out)], env=env,
                          capture_output=True, timeout=120)
    return proc.returncode


def test_killed_builds_resume_to_identical_output(hostile, tmp_path):
    out = tmp_path / "resumed"
    n_files = hostile["stats"]["totals"]["files"]
    # killed while decoding (after 5 files are journaled) ...
    assert _build_in_subprocess(hostile["srcs"], out, 5) == 75
    assert not (out / "build.json").exists()
    # ... then killed again while placing images (the 4th placement of the resumed run) ...
    assert _build_in_subprocess(hostile["srcs"], out, n_files - 5 + 3) == 75
    assert not (out / "build.json").exists() and len(list(out.glob("t*/*/*.jpg"))) == 3
    # ... and finished by a third run that redoes no decoding
    stats = build_dataset(hostile["srcs"], out, **OPTIONS)
    assert stats["run"]["decoded_files"] == 0 and stats["run"]["reused_files"] == n_files
    assert tree_bytes(out) == tree_bytes(hostile["out"])


def test_changed_options_rebuild_and_foreign_folders_are_refused(hostile, tmp_path):
    from llcm.errors import UserError

    out = tmp_path / "opts"
    build_dataset(hostile["srcs"], out, **OPTIONS)
    stats = build_dataset(hostile["srcs"], out, **dict(OPTIONS, cap=2))
    assert stats["classes"]["hospital-a/chest-xray/normal"]["train"] == 2
    assert len(read_split(out, "train")) == stats["totals"]["train"]
    assert len(list((out / "train").rglob("*.jpg"))) == stats["totals"]["train"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "my_thesis.docx").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        build_dataset(hostile["srcs"], foreign, **OPTIONS)
    with pytest.raises(UserError, match="must not contain"):
        build_dataset(hostile["srcs"], Path(hostile["srcs"][0]) / "out", **OPTIONS)
    with pytest.raises(UserError, match="not found"):
        build_dataset([str(tmp_path / "nowhere")], tmp_path / "x", **OPTIONS)


def test_cli_build_and_errors(hostile, tmp_path, capsys, monkeypatch):
    import llcm.cli
    from llcm.cli import main

    monkeypatch.setattr(llcm.cli, "COMMAND_MODULES", ["llcm.cli.data"])  # only this stage's commands

    out = tmp_path / "cli"
    rc = main(["data", "build", *hostile["srcs"], "--out", str(out), "--size", "64", "--cap", "3", "--holdout",
               "hospital-a/derm/*", "--workers", "1", "--quiet", "--licence", "hospital-b=CC BY 4.0"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "9 classes, 17 train, 15 test" in printed
    stats = json.loads((out / "stats.json").read_text())
    assert [s["licence"] for s in stats["sources"]] == ["unknown", "CC BY 4.0", "unknown"]
    rc = main(["data", "build", str(tmp_path / "missing"), "--out", str(tmp_path / "y"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "source not found" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# The test split of small classes, its determinism, and prompts without the source root's name


def make_classes(root: Path, sizes: dict[str, int], first_seed: int = 100, reverse: bool = False) -> Path:
    """`root/<class path>/<i>.png`, distinct pictures; `reverse` writes them in the opposite order
    and swaps the file names around (same pixels per class, other names and creation order)."""
    seed = first_seed
    todo = []
    for cls, n in sizes.items():
        names = [f"img{i}.png" for i in range(n)]
        if reverse:
            names = names[::-1]
        todo += [(root / cls / name, seed + i) for i, name in enumerate(names)]
        seed += n
    for path, s in (todo[::-1] if reverse else todo):
        save(path, pattern(s))
    return root


def rows_by_split(out: Path) -> dict[str, list[dict]]:
    return {sp: [{k: v for k, v in r.items() if k != "path"} for r in read_split(out, sp)] for sp in ("train", "test")}


@pytest.mark.parametrize("n,cap,fraction,expected", [
    (1, 2000, 0.1, 0), (2, 2000, 0.1, 1), (9, 2000, 0.1, 1), (25, 2000, 0.1, 3), (10, 2000, 0.5, 5),
    (2, 2000, 0.9, 1),  # never the last train image
    (30, 10, 0.1, 20), (30, 27, 0.1, 3),  # the cap's excess, or the fraction, whichever is larger
    (30, 10, 0.0, 20), (5, 10, 0.0, 0), (5, 0, 0.0, 0), (5, 0, 0.2, 1),
])
def test_n_test_images(n, cap, fraction, expected):
    from llcm.data.build import n_test_images

    assert n_test_images(n, cap, fraction) == expected


def test_small_classes_get_a_test_split(hostile, tmp_path):
    stats = hostile["stats"]
    assert stats["options"]["test_fraction"] == 0.1
    for cid, c in stats["classes"].items():
        if c["train"] + c["test"] >= 2:
            assert c["test"] >= 1, cid
    test_rows = read_split(hostile["out"], "test")
    assert {r["class"] for r in test_rows} == set(EXPECTED_CLASSES)  # llcm evaluate has every class
    card = (hostile["out"] / "card.md").read_text()
    assert "at least 10% of each class in test" in card
    assert "| hospital-b/chest-xray/pneumonia | X-ray | chest | pneumonia | 1 | 1 |" in card
    # a user's own small dataset: 2, 7 and 12 images per class, far below the cap of 2000
    src = make_classes(tmp_path / "echo", {"a4c_ultrasound": 2, "plax_ultrasound": 7, "psax_ultrasound": 12})
    stats = build_dataset([str(src)], tmp_path / "out", size=64, workers=1, progress=False)
    got = {cid: (c["train"], c["test"]) for cid, c in stats["classes"].items()}
    assert got == {"echo/a4c-ultrasound": (1, 1), "echo/plax-ultrasound": (6, 1), "echo/psax-ultrasound": (11, 1)}
    assert len(read_split(tmp_path / "out", "test")) == 3


def test_test_fraction_zero_keeps_the_cap_rule(hostile, tmp_path, monkeypatch):
    import llcm.cli
    from llcm.cli import main
    from llcm.data.build import _class_seed

    monkeypatch.setattr(llcm.cli, "COMMAND_MODULES", ["llcm.cli.data"])  # only this stage's commands
    out = tmp_path / "paper"
    stats = build_dataset(hostile["srcs"], out, **dict(OPTIONS, test_fraction=0))
    assert {c: (v["train"], v["test"]) for c, v in stats["classes"].items()} == EXPECTED_CAP_RULE
    assert stats["totals"]["train"] == 20 and stats["totals"]["test"] == 12
    # exactly the old split: the seeded permutation of the class's content hashes, first `cap` to train
    rows = rows_by_split(out)
    for cid in EXPECTED_CAP_RULE:
        if cid.startswith("hospital-a/derm/"):
            continue
        train = {r["content_hash"] for r in rows["train"] if r["class"] == cid}
        test = {r["content_hash"] for r in rows["test"] if r["class"] == cid}
        hashes = sorted(train | test)
        order = [hashes[i] for i in _class_seed(OPTIONS["seed"], cid).permutation(len(hashes))]
        assert (train, test) == (set(order[:3]), set(order[3:])), cid
    assert "no test fraction (the paper's rule)" in (out / "card.md").read_text()
    cli_out = tmp_path / "cli"
    assert main(["data", "build", *hostile["srcs"], "--out", str(cli_out), "--size", "64", "--cap", "3", "--holdout",
                 "hospital-a/derm/*", "--workers", "1", "--quiet", "--test-fraction", "0"]) == 0
    assert rows_by_split(cli_out) == rows


def test_test_metadata_is_written_even_when_empty(tmp_path):
    src = make_classes(tmp_path / "src", {"chest_xray/pneumonia": 3, "chest_xray/normal": 1})
    out = tmp_path / "out"
    stats = build_dataset([str(src)], out, size=64, cap=0, test_fraction=0, workers=1, progress=False)
    assert stats["totals"]["test"] == 0
    assert (out / "test" / "metadata.jsonl").read_bytes() == b""
    assert read_split(out, "test") == [] and len(read_split(out, "train")) == 4
    # the default fraction leaves the single-image class all in train
    stats = build_dataset([str(src)], out, size=64, cap=0, workers=1, progress=False)
    assert {c: (v["train"], v["test"]) for c, v in stats["classes"].items()} == {
        "src/chest-xray/normal": (1, 0), "src/chest-xray/pneumonia": (2, 1)}
    from llcm.errors import UserError

    with pytest.raises(UserError, match="--test-fraction"):
        build_dataset([str(src)], tmp_path / "bad", size=64, test_fraction=1.0, workers=1, progress=False)


def test_split_is_deterministic(tmp_path, monkeypatch):
    sizes = {"chest_xray/pneumonia": 6, "chest_xray/normal": 5, "brain_mri/glioma": 9}
    a = make_classes(tmp_path / "a" / "hospital", sizes)
    b = make_classes(tmp_path / "b" / "hospital", sizes, reverse=True)  # other names and creation order
    opts = dict(size=64, workers=1, progress=False)
    build_dataset([str(a)], tmp_path / "out-a", **opts)
    ref = rows_by_split(tmp_path / "out-a")
    assert len(ref["test"]) == 3  # one per class, below the cap

    real_walk = os.walk

    def reversed_walk(*args, **kwargs):  # a file system that lists in the opposite order
        for dirpath, dirnames, filenames in real_walk(*args, **kwargs):
            dirnames.reverse()
            filenames.reverse()
            yield dirpath, dirnames, filenames

    monkeypatch.setattr(os, "walk", reversed_walk)
    for src, out in ((a, "again-a"), (b, "out-b")):
        build_dataset([str(src)], tmp_path / out, **opts)
        assert rows_by_split(tmp_path / out) == ref, out
    build_dataset([str(a)], tmp_path / "seed1", seed=1, **opts)
    assert rows_by_split(tmp_path / "seed1")["test"] != ref["test"]  # the split is drawn with the seed


def test_root_folder_name_is_not_in_prompts(tmp_path):
    from llcm.data.taxonomy import Taxonomy, words

    train = make_classes(tmp_path / "train", {"echocardiogram_ultrasound": 2})
    src = make_classes(tmp_path / "src", {"cardiac/echocardiogram_ultrasound": 2, "chest_xray/pneumonia": 2},
                       first_seed=200)
    stats = build_dataset([str(train), str(src)], tmp_path / "out", size=64, workers=1, progress=False)
    prompts = {cid: c["prompt"] for cid, c in stats["classes"].items()}
    assert prompts == {"train/echocardiogram-ultrasound": "echocardiogram ultrasound",
                       "src/cardiac/echocardiogram-ultrasound": "cardiac echocardiogram ultrasound",
                       "src/chest-xray/pneumonia": "chest X-ray, pneumonia"}
    for split in ("train", "test"):
        for row in read_split(tmp_path / "out", split):
            assert not {"train", "src"} & set(words(row["text"])), row["text"]
    # the `{name}` of a prompt template is the class without its source, too
    info = Taxonomy(prompt_template="{name}").resolve("src/chest-xray/pneumonia", "pneumonia", ("chest_xray",))
    assert info.prompt == "chest xray pneumonia"
