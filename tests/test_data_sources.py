"""Sources: split/container folders, CSV labels, safe zip and tar extraction."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llcm.data.sources import SourceSpec, extract_archive, parse_sources, scan_source, split_components
from llcm.errors import UserError


def png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((8, 8)) * 255).astype(np.uint8)).save(path)


def test_split_and_container_levels():
    assert split_components(["Chest_XRay", "chest_xray", "Training", "images", "NORMAL"]) == (
        ["Chest_XRay", "NORMAL"], "train")
    assert split_components(["data", "valid", "Glioma"]) == (["Glioma"], "val")


def test_scan_labels_from_folders_and_csv(tmp_path):
    root = tmp_path / "ds"
    png(root / "train" / "cats" / "a.png")
    png(root / "test" / "cats" / "b.jpg")  # a PNG named .jpg still counts as a candidate
    png(root / "meta" / "ISIC_1.png")
    png(root / "meta" / "ISIC_2.png")
    (root / "meta" / "labels.tsv").write_text("image\tdiagnosis\nISIC_1\tmel\nISIC_2.png\tnv\nISIC_9\tnv\n")
    (root / "notes.md").write_text("#")
    png(root / ".hidden" / "x.png")
    (root / "cats" / "link.png").parent.mkdir(parents=True, exist_ok=True)
    (root / "cats" / "link.png").symlink_to(root / "train" / "cats" / "a.png")
    spec = SourceSpec(root, "ds")
    scan = scan_source(0, spec, root)
    got = {it.rel: (it.class_key, it.split) for it in scan.items}
    assert got == {
        "meta/ISIC_1.png": ("ds/meta/mel", ""),
        "meta/ISIC_2.png": ("ds/meta/nv", ""),
        "test/cats/b.jpg": ("ds/cats", "test"),
        "train/cats/a.png": ("ds/cats", "train"),
    }
    assert scan.rejected == {"link": 1} and scan.label_files == 1 and scan.label_rows_missing == 1
    assert scan.ignored == {".md": 1}


def test_parse_sources_names_and_errors(tmp_path):
    (tmp_path / "Brain Tumor").mkdir()
    (tmp_path / "x.zip").write_bytes(b"PK")
    specs = parse_sources([str(tmp_path / "Brain Tumor"), f"kvasir={tmp_path / 'Brain Tumor'}", tmp_path / "x.zip"],
                          {"kvasir": "CC BY 4.0"})
    assert [(s.name, s.licence) for s in specs] == [("brain-tumor", "unknown"), ("kvasir", "CC BY 4.0"),
                                                    ("x", "unknown")]
    with pytest.raises(UserError, match="not found"):
        parse_sources([str(tmp_path / "none")])
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(UserError, match="folder or a .zip/.tar"):
        parse_sources([str(tmp_path / "file.txt")])


def test_zip_extraction_is_contained(tmp_path):
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ok/one.png", b"x")
        zf.writestr("../up.png", b"x")
        zf.writestr("/abs.png", b"x")
        zf.writestr("ok/../../sneaky.png", b"x")
        link = zipfile.ZipInfo("ok/link.png")
        link.external_attr = 0o120777 << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("big.bin", b"\0" * 5000)
    dest = tmp_path / "x" / "out"
    info = extract_archive(z, dest, max_bytes=4000)
    assert info == {"unsafe": 4, "too_large": 1}
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["a.zip", "x/out/.llcm-extracted", "x/out/ok/one.png"]
    assert extract_archive(z, dest) == {"unsafe": 4, "too_large": 1}  # done marker: not extracted again


def test_tar_extraction_skips_links_and_devices(tmp_path):
    t = tmp_path / "a.tar.gz"
    with tarfile.open(t, "w:gz") as tf:
        for name in ("ok/one.png", "../up.png"):
            data = b"png!"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for kind, name in ((tarfile.SYMTYPE, "ok/sym.png"), (tarfile.LNKTYPE, "ok/hard.png"),
                           (tarfile.CHRTYPE, "ok/dev")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            tf.addfile(info)
    info = extract_archive(t, tmp_path / "dest")
    assert info == {"unsafe": 4, "too_large": 0}
    assert sorted(p.name for p in (tmp_path / "dest").rglob("*") if p.is_file()) == [".llcm-extracted", "one.png"]


def test_corrupt_archive_is_one_unreadable_input(tmp_path):
    from llcm.data import build_dataset

    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"PK\x03\x04 this is not really a zip")
    good = tmp_path / "good" / "xray" / "fracture"
    for i in range(2):
        good.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        Image.fromarray((rng.random((80, 80)) * 255).astype(np.uint8)).save(good / f"{i}.png")
    stats = build_dataset([str(bad), str(tmp_path / "good")], tmp_path / "out", size=64, workers=1, progress=False)
    assert stats["rejections"] == {"unreadable": 1} and stats["totals"]["images"] == 2
