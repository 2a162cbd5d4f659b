"""Turn what the user downloaded into a sorted list of labelled candidate files.

A source is a folder, or a zip/tar archive that is first extracted safely into the build's cache
(members with absolute paths, `..` components, links or devices are skipped and counted as
`unsafe_archive_member`; members whose declared size is over `readers.MAX_FILE_BYTES`, or that would
take the archive over its total, are skipped before a byte is inflated and counted as
`archive_member_too_large`; nothing is written outside the target).

Inside a source:
- folder levels named like splits (train/, Training/, test/, val/, valid/ ...) are splits, not
  classes; container levels (images/, data/, ...) are skipped; the remaining innermost folder is
  the label and the folders above it are context for the taxonomy;
- CSV/TSV files with a path column and a label column label the files they list (relative to the
  label file's folder or the source root, with or without extension); they win over folders;
- hidden files, `__MACOSX/` and links are never read (links are counted as `link`);
- an archive inside a source is not opened (counted as `nested_archive`: pass it as a source of its own).

Sources are only ever opened for reading.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from llcm.data.readers import MAX_FILE_BYTES, is_candidate
from llcm.data.taxonomy import slug, words
from llcm.errors import UserError

UNSAFE_MEMBER = "unsafe_archive_member"
MEMBER_TOO_LARGE = "archive_member_too_large"
NESTED_ARCHIVE = "nested_archive"
LINK = "link"
NO_LABEL = "no_label"

SPLITS = {
    "train": "train", "training": "train", "train-set": "train", "training-set": "train", "train-data": "train",
    "trainset": "train", "test": "test", "testing": "test", "test-set": "test", "testing-set": "test",
    "test-data": "test", "testset": "test", "holdout": "test", "val": "val", "valid": "val",
    "validation": "val", "val-set": "val", "validation-set": "val", "dev": "val", "eval": "val",
    "evaluation": "val",
}
CONTAINERS = {"images", "image", "imgs", "img", "data", "dataset", "files", "pics", "pictures", "all",
              "jpg", "jpeg", "png", "dicom", "dcm", "nifti", "raw"}
PATH_COLUMNS = ("path", "filepath", "file-path", "file", "filename", "file-name", "image", "image-path",
                "imagepath", "image-name", "image-file", "image-id", "imageid", "img", "img-path", "id", "name")
LABEL_COLUMNS = ("label", "labels", "class", "class-name", "classname", "category", "diagnosis", "dx",
                 "target", "finding", "findings", "finding-labels", "condition", "disease")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


@dataclass
class SourceSpec:
    """One user source: where it is, what to call it, under which licence it was obtained."""

    path: Path
    name: str
    licence: str = "unknown"

    @property
    def is_archive(self) -> bool:
        return self.path.is_file() and self.path.name.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass
class Item:
    """A candidate image file, its label (or None) and where it came from."""

    source: int
    rel: str
    path: Path
    label: str | None
    context: tuple[str, ...]
    split: str
    size: int
    key: str = ""  # journal key: a hash of (source, rel, size, mtime); no path is ever stored
    class_key: str = ""


@dataclass
class ScanResult:
    items: list[Item] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)  # reason -> count (links, no label...)
    ignored: Counter = field(default_factory=Counter)  # extension -> count (not images)
    label_files: int = 0
    label_rows_missing: int = 0


def archive_stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def parse_sources(sources, licences=None) -> list[SourceSpec]:
    """`sources`: paths, "NAME=PATH" strings, or dicts {path, name, licence}. Names are unique slugs."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if licences is None:
        licences = {}
    specs: list[SourceSpec] = []
    for entry in sources:
        name = licence = None
        if isinstance(entry, dict):
            path = Path(entry["path"])
            name, licence = entry.get("name"), entry.get("licence") or entry.get("license")
        else:
            text = os.fspath(entry)
            path = Path(text)
            if not path.exists() and "=" in text:
                name, _, rest = text.partition("=")
                path = Path(rest)
        path = path.expanduser()
        if not path.exists():
            raise UserError(f"source not found: {path}")
        path = path.resolve()
        if not path.is_dir() and not path.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise UserError(f"source must be a folder or a .zip/.tar archive: {path}")
        base = slug(name or (archive_stem(path) if path.is_file() else path.name)) or "source"
        unique, n = base, 2
        while unique in {s.name for s in specs}:
            unique, n = f"{base}-{n}", n + 1
        if licence is None:
            licence = licences.get(unique) or licences.get(base) or licences.get("*") or "unknown"
        specs.append(SourceSpec(path=path, name=unique, licence=str(licence)))
    if not specs:
        raise UserError("no sources given")
    return specs


# ----------------------------------------------------------------------------------------------
# Safe archive extraction


def _safe_member_path(name: str) -> PurePosixPath | None:
    name = name.replace("\\", "/")
    if not name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts) or any("\x00" in p for p in parts):
        return None
    return PurePosixPath(*parts)


def _copy_limited(src, dst_path: Path, limit: int) -> int:
    """Stream at most `limit` bytes; raises ValueError when the member is bigger than declared."""
    tmp = dst_path.with_name(f".{dst_path.name}.llcm-tmp")
    written = 0
    with open(tmp, "wb") as out:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            written += len(chunk)
            if written > limit:
                out.close()
                tmp.unlink()
                raise ValueError("member larger than declared")
            out.write(chunk)
    os.replace(tmp, dst_path)
    return written


def archive_fingerprint(archive: Path) -> str:
    st = archive.stat()
    return f"{archive.name}:{st.st_size}:{st.st_mtime_ns}"


def extract_archive(archive: Path, dest: Path, *, max_bytes: int = 64 << 30, max_members: int = 2_000_000,
                    max_ratio: float = 2000.0, max_member_bytes: int = MAX_FILE_BYTES) -> dict:
    """Extract regular files only, each inside `dest`; returns counts {"unsafe": n, "too_large": n}.

    Sizes are judged from the archive's directory before anything is inflated, and the copy stops at
    the declared size (a member that lies about it is dropped). Idempotent: a marker holding the
    archive's fingerprint makes a second call free; a changed archive is extracted again."""
    marker = dest / ".llcm-extracted"
    fingerprint = archive_fingerprint(archive)
    if marker.exists():
        try:
            done = json.loads(marker.read_text())
            if done.get("archive") == fingerprint:
                return {"unsafe": int(done["unsafe"]), "too_large": int(done["too_large"])}
        except (ValueError, KeyError, TypeError):
            pass
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    counts = Counter()
    total = 0
    members = 0

    def target_for(name: str, regular: bool, size: int, packed: int | None) -> Path | None:
        """The one check of an archive member: where it goes, or None (counted) when it is refused."""
        nonlocal members
        members += 1
        rel = _safe_member_path(name)
        target = dest.joinpath(*rel.parts) if rel is not None else None
        if (target is None or not regular
                or os.path.commonpath([os.path.abspath(target), os.path.abspath(dest)]) != os.path.abspath(dest)):
            counts["unsafe"] += 1
            return None
        bomb = packed is not None and size > (16 << 20) and size > max_ratio * max(packed, 1)
        if size > max_member_bytes or total + size > max_bytes or members > max_members or bomb:
            counts["too_large"] += 1
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in sorted(zf.infolist(), key=lambda i: i.filename):
                    if info.is_dir():
                        continue
                    file_type = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip records no type
                    regular = file_type in (0, stat.S_IFREG) and not info.flag_bits & 0x1  # not encrypted
                    target = target_for(info.filename, regular, info.file_size, info.compress_size)
                    if target is None:
                        continue
                    try:
                        with zf.open(info) as src:
                            total += _copy_limited(src, target, info.file_size)
                    except Exception:  # noqa: BLE001 - a corrupt member is skipped, not fatal
                        counts["unsafe"] += 1
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tf:
                for m in sorted(tf.getmembers(), key=lambda m: m.name):
                    if m.isdir():
                        continue
                    target = target_for(m.name, m.isfile(), m.size, None)
                    if target is None:
                        continue
                    try:
                        src = tf.extractfile(m)
                        total += _copy_limited(src, target, m.size)
                    except Exception:  # noqa: BLE001
                        counts["unsafe"] += 1
        else:
            raise UserError(f"not a readable zip or tar archive: {archive}")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise UserError(f"cannot read archive {archive.name}: {exc}") from None
    result = {"unsafe": counts["unsafe"], "too_large": counts["too_large"]}
    tmp = marker.with_name(".llcm-extracted.tmp")
    tmp.write_text(json.dumps({"archive": fingerprint, **result}))
    os.replace(tmp, marker)
    return result


# ----------------------------------------------------------------------------------------------
# Walking and labelling


def _norm_column(name: str) -> str:
    return slug(name)


def _find_column(header: list[str], wanted: tuple[str, ...], explicit: str | None) -> int | None:
    normed = [_norm_column(h) for h in header]
    if explicit:
        key = _norm_column(explicit)
        return normed.index(key) if key in normed else None
    for w in wanted:
        if w in normed:
            return normed.index(w)
    return None


def split_components(parts: list[str]) -> tuple[list[str], str]:
    """Folder names -> (kept names, split): split and container levels removed, repeats collapsed."""
    kept: list[str] = []
    split = ""
    for comp in parts:
        s = slug(comp)
        if s in SPLITS:
            split = SPLITS[s]
            continue
        if not s or s in CONTAINERS:
            continue
        if kept and slug(kept[-1]).replace("-", "") == s.replace("-", ""):  # "Chest_XRay/chest_xray"
            continue
        kept.append(comp)
    return kept, split


def make_class_key(source_name: str, context: tuple[str, ...], label: str) -> str:
    parts: list[str] = []
    for comp in (source_name, *context, label):
        s = slug(comp)
        if s and (not parts or parts[-1].replace("-", "") != s.replace("-", "")):
            parts.append(s)
    return "/".join(parts)


def _read_label_file(path: Path) -> list[list[str]]:
    raw = path.read_bytes()
    text = raw.decode("utf-8-sig", errors="replace")
    first = text.splitlines()[0] if text else ""
    delim = "\t" if path.suffix.lower() == ".tsv" or ("\t" in first and "," not in first) else ","
    return [row for row in csv.reader(io.StringIO(text), delimiter=delim) if row]


def scan_source(index: int, spec: SourceSpec, root: Path, *, path_column: str | None = None,
                label_column: str | None = None, include_mtime: bool = True) -> ScanResult:
    """All candidate files of one source (sorted by relative path) with their labels."""
    result = ScanResult()
    candidates: list[tuple[str, Path, os.stat_result]] = []
    label_files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        keep_dirs = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            if d.startswith(".") or d == "__MACOSX":
                continue
            if os.path.islink(full):
                result.rejected[LINK] += 1
                continue
            keep_dirs.append(d)
        dirnames[:] = keep_dirs
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue
            full = Path(dirpath) / fname
            rel = full.relative_to(root).as_posix()
            try:
                st = os.lstat(full)
            except OSError:
                result.rejected["unreadable"] += 1
                continue
            if stat.S_ISLNK(st.st_mode):
                result.rejected[LINK] += 1
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            low = fname.lower()
            if low.endswith(ARCHIVE_SUFFIXES):
                result.rejected[NESTED_ARCHIVE] += 1
                continue
            if low.endswith((".csv", ".tsv")):
                label_files.append((rel, full))
                continue
            head = b""
            suffix = full.suffix.lower()
            if not suffix or suffix not in {".jpg", ".jpeg", ".png", ".dcm", ".tif", ".tiff", ".bmp", ".gif",
                                           ".webp", ".nii", ".gz", ".dicom", ".ima", ".jpe", ".dic"}:
                try:
                    with open(full, "rb") as fh:
                        head = fh.read(512)
                except OSError:
                    head = b""
            if is_candidate(full, head):
                candidates.append((rel, full, st))
            else:
                ext = "".join(PurePosixPath(low).suffixes[-2:]) if low.endswith(".gz") else (full.suffix.lower() or "(none)")
                result.ignored[ext] += 1
    candidates.sort(key=lambda c: c[0])

    # CSV/TSV labels: rel -> (label, context, split)
    csv_labels: dict[str, tuple[str, tuple[str, ...], str]] = {}
    by_rel = {c[0]: c for c in candidates}
    stems: dict[tuple[str, str], list[str]] = {}
    for rel, _, _ in candidates:
        p = PurePosixPath(rel)
        name = p.name
        stem = name[:-7] if name.lower().endswith(".nii.gz") else p.stem
        stems.setdefault((str(p.parent), stem.lower()), []).append(rel)
        stems.setdefault(("*", stem.lower()), []).append(rel)
    for rel_csv, path_csv in sorted(label_files):
        try:
            rows = _read_label_file(path_csv)
        except OSError:
            continue
        if len(rows) < 2:
            continue
        header = rows[0]
        pcol = _find_column(header, PATH_COLUMNS, path_column)
        lcol = _find_column(header, LABEL_COLUMNS, label_column)
        if pcol is None or lcol is None or pcol == lcol:
            result.ignored[Path(rel_csv).suffix.lower()] += 1
            continue
        result.label_files += 1
        csv_dir = PurePosixPath(rel_csv).parent
        kept, split = split_components(list(csv_dir.parts))
        stem_split = SPLITS.get(slug(PurePosixPath(rel_csv).stem), "")
        for row in rows[1:]:
            if len(row) <= max(pcol, lcol):
                continue
            ref, label = row[pcol].strip().replace("\\", "/"), row[lcol].strip()
            if not ref or not label:
                continue
            found = None
            for base in (csv_dir, PurePosixPath(".")):
                cand = (base / ref).as_posix()
                cand = str(PurePosixPath(os.path.normpath(cand))) if cand else cand
                if cand in by_rel:
                    found = cand
                    break
            if found is None:
                refp = PurePosixPath(ref)
                for scope in ((str(csv_dir / refp.parent), refp.name.lower()), ("*", refp.name.lower()),
                              ("*", refp.stem.lower())):
                    hits = stems.get(scope, [])
                    if len(hits) == 1:
                        found = hits[0]
                        break
            if found is None:
                result.label_rows_missing += 1
                continue
            csv_labels.setdefault(found, (label, tuple(kept), split or stem_split))

    src_tag = hashlib.sha256(f"{index}:{spec.name}".encode()).hexdigest()[:16]
    for rel, full, st in candidates:
        if rel in csv_labels:
            label, context, split = csv_labels[rel]
            _, folder_split = split_components(list(PurePosixPath(rel).parent.parts))
            split = split or folder_split
        else:
            kept, split = split_components(list(PurePosixPath(rel).parent.parts))
            label, context = (kept[-1], tuple(kept[:-1])) if kept else (None, ())
        mtime = st.st_mtime_ns if include_mtime else 0
        key = hashlib.sha256(f"{src_tag}|{rel}|{st.st_size}|{mtime}".encode()).hexdigest()[:32]
        item = Item(source=index, rel=rel, path=full, label=label, context=context, split=split,
                    size=st.st_size, key=key)
        if label is not None and words(label):
            item.class_key = make_class_key(spec.name, context, label)
        else:
            item.label = None
        result.items.append(item)
    return result
