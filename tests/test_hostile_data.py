"""Hostile inputs to `llcm data build`, second round (issue 18): decompression bombs, nested archives,
NIfTI slicing, dead workers, identifiers in a DICOM code field, out-of-range numbers, manifests that
point outside the dataset. Every hostile input is built here, small on disk."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llcm.data import build_dataset, read_split, readers
from llcm.errors import UserError

SRC_DIR = Path(__file__).resolve().parents[1] / "src"
GIB = 1 << 30


def pattern(seed: int, size: int = 72) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((size // 8, size // 8)) * 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)


def png(path: Path, seed: int, size: int = 72) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pattern(seed, size)).save(path)
    return path


class Zeros(io.RawIOBase):
    """`n` zero bytes, read in pieces (tarfile copies from it)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        k = min(len(buf), self.left)
        buf[:k] = bytes(k)
        self.left -= k
        return k


def zip_bomb(path: Path, n: int = 600 << 20) -> Path:
    """One deflated member of `n` zeros (about 1 MB on disk per GiB), written as a stream."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("scans/xray/zeros.png", "w", force_zip64=True) as out:
            block = bytes(1 << 20)
            for _ in range(n >> 20):
                out.write(block)
        zf.writestr("scans/xray/ok.png", _png_bytes(1))
    return path


def tar_bomb(path: Path, n: int = 600 << 20) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=9) as tf:
        info = tarfile.TarInfo("scans/xray/zeros.png")
        info.size = n
        tf.addfile(info, io.BufferedReader(Zeros(n), 1 << 20))
        data = _png_bytes(2)
        info = tarfile.TarInfo("scans/xray/ok.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return path


def _png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pattern(seed)).save(buf, "PNG")
    return buf.getvalue()


def nifti_claiming(path: Path, shape: tuple, data: int = 64) -> Path:
    """A .nii.gz whose header claims `shape` (uint8) and that holds `data` zero bytes of voxels."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(header.binaryblock + b"\0" * 4)
        block = bytes(1 << 20)
        for _ in range(data >> 20):
            fh.write(block)
        fh.write(bytes(data & ((1 << 20) - 1)))
    return path


def dicom_bytes(rows: int, cols: int, pixel_bytes: bytes | None = b"\0" * 64, deflated: bool = False,
                **extra) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, "1.2.3.4"
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "1.2.3.4"
    ds.Modality, ds.BodyPartExamined = "CT", "HEAD"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for k, v in extra.items():
        setattr(ds, k, v)
    if pixel_bytes is not None:
        ds.PixelData = pixel_bytes
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def deflated_dicom_bomb(path: Path, side: int = 16384) -> Path:
    """A Deflated Explicit VR DICOM whose data set inflates to side*side*2 bytes of zero pixels."""
    import struct
    import zlib

    def meta_end(b: bytes) -> int:  # preamble + DICM + (0002,0000) UL element + the group's length
        return 144 + struct.unpack("<I", b[140:144])[0]

    head = dicom_bytes(side, side, pixel_bytes=None, deflated=True)
    plain = dicom_bytes(side, side, pixel_bytes=None)
    n = side * side * 2
    body = plain[meta_end(plain):] + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", n)  # (7FE0,0010)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(head[: meta_end(head)] + z.compress(body))
        for start in range(0, n, 1 << 20):
            fh.write(z.compress(bytes(min(1 << 20, n - start))))
        fh.write(z.flush())
    return path


def _peak_rss_of_build(args: list[str], timeout: int = 300) -> tuple[int, str]:
    """Run `llcm data build ARGS` in a child of a small wrapper; return (peak RSS in bytes, stderr)."""
    wrapper = ("import resource, subprocess, sys; "
               "p = subprocess.run([sys.executable, '-m', 'llcm.cli', 'data', 'build', *sys.argv[1:]]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(p.returncode)")
    env = dict(os.environ, PYTHONPATH=str(SRC_DIR), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", wrapper, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip().splitlines()[-1]), proc.stderr


# ----------------------------------------------------------------------------------------------
# 1. decompression bombs


def test_decompression_bombs_are_refused_from_headers_with_counted_reasons_and_bounded_memory(tmp_path):
    folder = tmp_path / "scans"
    nifti_claiming(folder / "mri" / "claims-huge.nii.gz", (32767, 32767, 64))  # header lies, little data
    nifti_claiming(folder / "mri" / "zeros.nii.gz", (1024, 1024, 257), data=1024 * 1024 * 257)  # > 2**28 voxels
    (folder / "ct").mkdir(parents=True)
    (folder / "ct" / "claims-huge.dcm").write_bytes(dicom_bytes(65535, 65535, NumberOfFrames=50))
    deflated_dicom_bomb(folder / "ct" / "deflated.dcm")
    for i in range(2):
        png(folder / "xray" / f"ok{i}.png", 10 + i)
    srcs = [str(zip_bomb(tmp_path / "bomb.zip")), str(tar_bomb(tmp_path / "bomb.tar.gz")), str(folder)]
    assert sum(Path(s).stat().st_size for s in srcs[:2]) < 8 << 20  # small on disk
    out = tmp_path / "out"
    peak, _ = _peak_rss_of_build([*srcs, "--out", str(out), "--size", "64", "--workers", "1", "--quiet",
                                  "--keep-cache"])
    assert peak < GIB, f"peak RSS {peak / GIB:.2f} GiB"
    stats = json.loads((out / "stats.json").read_text())
    by_source = {s["name"]: s["rejections"] for s in stats["sources"]}
    assert by_source["bomb"] == {"archive_member_too_large": 1}
    assert by_source["bomb-2"] == {"archive_member_too_large": 1}
    assert by_source["scans"] == {"too_large": 4}
    assert not (out / ".llcm-build" / "extract" / "0-bomb" / "scans" / "xray" / "zeros.png").exists()
    card = (out / "card.md").read_text()
    assert "`archive_member_too_large` | 2 |" in card and "`too_large` | 4 |" in card
    assert stats["totals"]["train"] + stats["totals"]["test"] == 4  # the good files still make it


def test_size_limits_are_generous_for_real_volumes():
    """The header checks let through a volume of MAX_PIXELS voxels and refuse one more."""
    readers.check_pixels(readers.MAX_PIXELS, "volume")
    assert readers.MAX_PIXELS >= 1 << 28 and readers.MAX_FILE_BYTES >= 256 << 20
    with pytest.raises(readers.Rejected, match="too_large"):
        readers.check_pixels(readers.MAX_PIXELS + 1, "volume")


# ----------------------------------------------------------------------------------------------
# 2. archives inside a source folder


def test_archive_inside_a_source_folder_is_counted_not_silently_skipped(tmp_path):
    src = tmp_path / "downloads"
    inner = src / "knee.zip"
    src.mkdir()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("knee/osteoarthritis/k0.png", _png_bytes(3))
    with tarfile.open(src / "more.tar.gz", "w:gz") as tf:
        data = _png_bytes(4)
        info = tarfile.TarInfo("knee/osteoarthritis/k1.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    for i in range(2):
        png(src / "chest" / "normal" / f"n{i}.png", 20 + i)
    stats = build_dataset([src], tmp_path / "out", size=64, progress=False, workers=1)
    assert stats["rejections"] == {"nested_archive": 2}
    assert "`nested_archive` | 2 |" in (tmp_path / "out" / "card.md").read_text()


# ----------------------------------------------------------------------------------------------
# 3. NIfTI slicing


def test_nifti_slices_use_basic_indexing_and_match_the_take_reference(monkeypatch):
    import nibabel as nib

    rng = np.random.default_rng(0)
    vol = np.asfortranarray(rng.integers(1, 3000, (20, 24, 6)).astype(np.int16))
    raw = nib.Nifti1Image(vol, np.eye(4)).to_bytes()
    ref = vol.astype(np.float64)
    lo, hi = np.percentile(ref[ref != 0], [0.5, 99.5])
    lo = min(float(lo), 0.0)
    unit = np.clip((ref - lo) / (hi - lo), 0.0, 1.0)
    expected = {axis: [readers.to_uint8(np.ascontiguousarray(np.rot90(np.take(unit, i, axis=ax))))
                       for i in range(vol.shape[ax])] for axis, ax in readers.NIFTI_AXES.items()}

    def no_take(*a, **k):
        raise AssertionError("np.take copies with a slow gather on a Fortran-ordered volume")

    monkeypatch.setattr(readers.np, "take", no_take)
    for axis in readers.NIFTI_AXES:
        frames = readers.read_nifti(raw, axis=axis).frames
        assert [f.index for f in frames] == list(range(len(expected[axis])))
        for frame, want in zip(frames, expected[axis]):
            assert frame.pixels.flags.c_contiguous and np.array_equal(frame.pixels, want)


# ----------------------------------------------------------------------------------------------
# 4. a dead decoding worker


def test_a_killed_decoding_worker_fails_its_file_and_the_build_finishes(tmp_path):
    src = tmp_path / "src"
    for i in range(20):
        png(src / "chest" / ("normal" if i % 2 else "pneumonia") / f"img{i:02d}.png", 100 + i)
    # every Python process of the build (workers included) loads this: the worker decoding
    # img07.png kills itself, as the OOM killer would
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal\n"
        "import llcm.data.readers as r\n"
        "_decode = r.decode_file\n"
        "def decode_file(path, **kw):\n"
        "    if str(path).endswith('img07.png'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return _decode(path, **kw)\n"
        "r.decode_file = decode_file\n")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=f"{hook}{os.pathsep}{SRC_DIR}", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "llcm.cli", "data", "build", str(src), "--out", str(out),
                             "--size", "64", "--workers", "2", "--quiet"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the build and its workers
        proc.communicate()
        pytest.fail("the build hung on a dead worker")
    assert proc.returncode == 0, err[-2000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rejections"] == {"decoder_process_died": 1}
    assert stats["totals"]["train"] + stats["totals"]["test"] == 19


# ----------------------------------------------------------------------------------------------
# 5. identifiers in Body Part Examined


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
def test_body_part_keeps_only_dicom_defined_terms_and_counts_the_rest(tmp_path):
    src = tmp_path / "src" / "head_ct" / "bleed"
    src.mkdir(parents=True)
    values = ["JANE DOE", "98765432", "SMITH", "HEAD", "chest"]
    for i, value in enumerate(values):
        px = (pattern(200 + i, 80).astype(np.uint16) * 16).tobytes()
        (src / f"{i}.dcm").write_bytes(dicom_bytes(80, 80, px, BodyPartExamined=value,
                                                   WindowCenter=2000, WindowWidth=4000))
    out = tmp_path / "out"
    stats = build_dataset([tmp_path / "src"], out, size=64, progress=False, workers=1, test_fraction=0)
    rows = read_split(out, "train") + read_split(out, "test")
    assert sorted(r["dicom_body_part"] for r in rows) == ["", "", "", "CHEST", "HEAD"]
    text = "".join(p.read_text() for p in out.rglob("*") if p.suffix in (".jsonl", ".json", ".md"))
    assert "JANE" not in text and "98765432" not in text and "SMITH" not in text
    assert stats["dicom_values_dropped"] == {"body_part": 3}
    assert "left empty for 3 image(s)" in (out / "card.md").read_text()


# ----------------------------------------------------------------------------------------------
# 6. numbers and manifests


@pytest.mark.parametrize("args, message", [
    (["--size", "100000"], "--size must be between 8 and 4096"),
    (["--cap", "-1"], "--cap must be 0"),
    (["--holdout-count", "-2"], "--holdout-count must be 0"),
])
def test_out_of_range_build_numbers_are_one_line_errors_and_write_nothing(tmp_path, capsys, args, message):
    from llcm.cli import main

    png(tmp_path / "src" / "chest" / "normal" / "a.png", 1)
    out = tmp_path / "out"
    assert main(["data", "build", str(tmp_path / "src"), "--out", str(out), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_mini_per_class_zero_is_refused(tmp_path):
    from llcm.data.mini import build_mini

    with pytest.raises(UserError, match="--per-class must be between 1 and"):
        build_mini(tmp_path / "mini", per_class=0, progress=False)
    assert not (tmp_path / "mini").exists()


def test_manifest_file_name_outside_the_dataset_is_refused(tmp_path):
    secret = tmp_path / "x.jpg"
    Image.fromarray(pattern(5)).save(secret)
    ds = tmp_path / "data" / "ds"
    (ds / "train").mkdir(parents=True)
    (ds / "build.json").write_text("{}")
    for bad in ("../../x.jpg", str(secret), "a/../../../x.jpg", "..\\..\\x.jpg"):
        (ds / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": bad, "text": "t"}) + "\n")
        with pytest.raises(UserError, match="points outside the dataset"):
            read_split(ds, "train")
    (ds / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "a/ok.jpg"}) + "\n")
    assert read_split(ds, "train")[0]["path"] == str(ds.resolve() / "train" / "a" / "ok.jpg")
