"""`build_dataset`: any pile of medical image folders/archives -> a clean, documented image folder.

Stages (each a function; data flows one way):

1. `parse_sources`, safe archive extraction, `scan_source` -> sorted candidate files with labels.
2. Decode + validate + hash + resize + encode, one file per task, across processes
   (`process_item`); each result is appended to a journal and its image stored once, under its
   content hash, in the build cache. An interrupted build reloads the journal and skips those files.
3. `assemble`: in canonical order (source, path, frame) apply the label checks, then exact and
   perceptual de-duplication within and across sources; resolve each class in the taxonomy.
4. `split_classes`: per class, a seeded permutation of the images (ordered by content hash) puts
   at most `cap` in train and the rest in test, where the rest is at least `test_fraction` of the
   class (one image for a class of two or more); held-out classes go entirely to test.
5. Place each image at `<split>/<class>/<hash16>.<ext>` (hard link or copy to a temp name, then
   `os.replace`), write `metadata.jsonl` per split (also when empty), `stats.json`, `card.md`, and
   `build.json` last: its presence with the same fingerprint means the folder is complete.

Everything written depends only on the inputs and the options (no time stamps, no absolute paths,
no file names from the sources), so a rebuild is byte-identical. Output image names are content
hashes, so nothing of a source's file names (which may hold patient identifiers) is copied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from llcm.data import cleaning, readers, sources
from llcm.data.taxonomy import ClassInfo, Taxonomy, class_dir_name, load_mapping
from llcm.errors import UserError

BUILDER_VERSION = 2  # 2: header size limits, Body Part Examined defined terms only
CACHE_DIR = ".llcm-build"
SPLITS = ("train", "test")
TEXT_OUTPUTS = ("build.json", "stats.json", "card.md")
WORKER_DIED = "decoder_process_died"
MAX_SIZE = 4096  # --size: the largest output side
CRASH_ENV = "LLCM_DATA_BUILD_CRASH_AFTER"  # test hook: hard-exit after N journal/placement steps

# Every reason an image can be left out, in report order, with its card description.
REASONS = {
    readers.UNREADABLE: "unreadable, corrupt, truncated or empty file",
    readers.NOT_AN_IMAGE: "not an image (unrecognised content)",
    readers.TOO_LARGE: "more pixels or bytes than the decoder limits (checked from the header, before decoding)",
    readers.DICOM_NO_PIXELS: "DICOM without pixel data (report, RT plan, ...)",
    readers.DICOM_UNDECODABLE: "compressed DICOM that no installed decoder can read",
    readers.DICOM_BURNED_IN: "DICOM flagged with burned-in annotation (possible identifiers in pixels)",
    readers.EMPTY_SLICE: "empty NIfTI slice",
    cleaning.TOO_SMALL: "shorter side below the minimum size",
    cleaning.BLANK: "constant or blank image",
    sources.UNSAFE_MEMBER: "archive member not extracted (path outside target, link, device, encrypted, corrupt)",
    sources.MEMBER_TOO_LARGE: "archive member not extracted: over the size limits (possible decompression bomb)",
    sources.NESTED_ARCHIVE: "archive inside a source, not opened (pass it as a source of its own)",
    sources.LINK: "symbolic link (not followed)",
    sources.NO_LABEL: "no class label (file not in a class folder or label file)",
    "label_contains_phi": "class label contains a DICOM patient identifier",
    "excluded_class": "class excluded by the mapping file",
    "unmapped_class": "class not in the taxonomy (--require-mapped)",
    cleaning.EXACT_DUPLICATE: "exact duplicate (same decoded pixels)",
    cleaning.NEAR_DUPLICATE: "near duplicate (perceptual hash within the distance)",
    "internal_error": "unexpected decoder error (please report)",
    WORKER_DIED: "the decoding process died on this file (killed, e.g. out of memory)",
}


@dataclass
class BuildOptions:
    """Every option of a build. Those in `output_fields()` change the output; the rest do not."""

    size: int = 512
    crop: bool = True
    image_format: str = "jpg"
    quality: int = 95
    color: str = "rgb"
    cap: int = 2000
    test_fraction: float = 0.1
    seed: int = 0
    holdout: tuple[str, ...] = ()
    holdout_count: int = 0
    min_size: int = 64
    blank_std: float = 2.0
    near_duplicate_distance: int = 12
    mapping: str | None = None
    prompt_template: str | None = None
    require_mapped: bool = False
    nifti_axis: str = "axial"
    nifti_step: int = 1
    licences: dict = field(default_factory=dict)
    path_column: str | None = None
    label_column: str | None = None
    max_archive_bytes: int = 64 << 30
    title: str = "llcm medical image dataset"
    notes: str = ""
    workers: int = 0
    force: bool = False
    keep_cache: bool = False
    progress: bool = True

    NON_OUTPUT = ("workers", "force", "keep_cache", "progress", "mapping", "licences")

    def validate(self) -> None:
        """The one check of the build's numbers (the CLI's and the Python API's)."""
        if not 8 <= self.size <= MAX_SIZE:
            raise UserError(f"--size must be between 8 and {MAX_SIZE}")
        if self.cap < 0:
            raise UserError("--cap must be 0 (no cap) or more")
        if self.holdout_count < 0:
            raise UserError("--holdout-count must be 0 or more")
        if self.workers < 0:
            raise UserError("--workers must be 0 (one per CPU) or more")
        if self.blank_std < 0:
            raise UserError("--blank-std must be 0 or more")
        if self.near_duplicate_distance < -1:
            raise UserError("--near-dup-distance must be -1 (off) or more")
        if self.image_format not in ("jpg", "png"):
            raise UserError("--format must be jpg or png")
        if not 1 <= self.quality <= 100:
            raise UserError("--quality must be between 1 and 100")
        if self.color not in ("rgb", "keep"):
            raise UserError("color must be 'rgb' or 'keep'")
        if self.nifti_axis not in readers.NIFTI_AXES:
            raise UserError(f"--nifti-axis must be one of {', '.join(readers.NIFTI_AXES)}")
        if self.nifti_step < 1:
            raise UserError("--nifti-step must be at least 1")
        if self.near_duplicate_distance > 256:
            raise UserError("--near-dup-distance must be at most 256 (of 512 bits)")
        if self.min_size < 1:
            raise UserError("--min-size must be at least 1")
        if not 0 <= self.test_fraction < 1:
            raise UserError("--test-fraction must be at least 0 and below 1")

    def output_fields(self) -> dict:
        d = dataclasses.asdict(self)
        out = {k: v for k, v in d.items() if k not in self.NON_OUTPUT}
        out["holdout"] = list(self.holdout)
        return out

    def worker_options(self) -> dict:
        keys = ("size", "crop", "image_format", "quality", "color", "min_size", "blank_std", "nifti_axis",
                "nifti_step")
        return {k: getattr(self, k) for k in keys}


# ----------------------------------------------------------------------------------------------
# Small I/O helpers


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename over `path` (never half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.llcm-tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


class _CrashHook:
    """Hard exit after N steps when LLCM_DATA_BUILD_CRASH_AFTER=N (simulates a killed build)."""

    def __init__(self) -> None:
        value = os.environ.get(CRASH_ENV, "").strip()
        self.left = int(value) if value else None

    def tick(self) -> None:
        if self.left is not None:
            self.left -= 1
            if self.left <= 0:
                os._exit(75)


# ----------------------------------------------------------------------------------------------
# Per-file work (runs in worker processes)


def encode_output(pixels: np.ndarray, opts: dict) -> tuple[bytes, int, int]:
    """Shorter side -> size (+ centre crop), then JPEG (quality) or PNG bytes."""
    from PIL import Image

    img = Image.fromarray(pixels)
    w, h = img.size
    size = int(opts["size"])
    if opts["crop"]:
        s = min(w, h)
        box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
        target = (size, size)
    else:
        box = (0, 0, w, h)
        target = (size, max(1, round(h * size / w))) if w <= h else (max(1, round(w * size / h)), size)
    if target != (w, h) or box != (0, 0, w, h):
        img = img.resize(target, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    gray = img.mode == "L"
    if opts["color"] == "rgb" and gray:
        img = img.convert("RGB")
    buf = io.BytesIO()
    if opts["image_format"] == "jpg":
        # colour: 4:4:4 chroma; gray stored as RGB has flat chroma, so 4:2:0 loses nothing and is faster
        img.save(buf, "JPEG", quality=int(opts["quality"]), subsampling=2 if gray else 0, optimize=False)
    else:
        img.save(buf, "PNG", compress_level=6)
    return buf.getvalue(), img.size[0], img.size[1]


def process_item(task: tuple) -> dict:
    """Decode one file; validate, hash and encode each frame; store encoded images by hash.

    Never raises: every failure becomes a per-frame rejection reason."""
    key, path, opts, objects_dir = task
    try:
        decoded = readers.decode_file(Path(path), nifti_axis=opts["nifti_axis"], nifti_step=opts["nifti_step"])
    except readers.Rejected as exc:
        phi = getattr(exc, "phi_tokens", None)
        return {"key": key, "frames": [{"i": 0, "reject": exc.reason}], "phi": phi or [], "dicom": phi is not None}
    except Exception:  # noqa: BLE001 - a bug or an exotic file must not stop the build
        return {"key": key, "frames": [{"i": 0, "reject": "internal_error"}], "phi": []}
    frames = [{"i": int(i), "reject": reason} for i, reason in decoded.rejected]
    ext = opts["image_format"]
    for fr in decoded.frames:
        try:
            thumb = cleaning.thumbnail(fr.pixels) if min(fr.pixels.shape[:2]) >= opts["min_size"] else None
            reason = cleaning.check_frame(fr.pixels, min_size=opts["min_size"], blank_std=opts["blank_std"],
                                          thumb=thumb)
            if reason:
                frames.append({"i": fr.index, "reject": reason})
                continue
            digest = cleaning.content_hash(fr.pixels)
            phash = cleaning.perceptual_hash(fr.pixels, thumb)
            # the encoded image, stored once per content hash (exact duplicates share it)
            data, ow, oh = encode_output(fr.pixels, opts)
            atomic_write(Path(objects_dir) / f"{digest}.{ext}", data)
            frames.append({"i": fr.index, "hash": digest, "phash": f"{phash:064x}", "w": ow, "h": oh,
                           "ow": int(fr.pixels.shape[1]), "oh": int(fr.pixels.shape[0]), "meta": fr.meta})
        except Exception:  # noqa: BLE001
            frames.append({"i": fr.index, "reject": "internal_error"})
    frames.sort(key=lambda f: f["i"])
    if not frames:
        frames = [{"i": 0, "reject": readers.NOT_AN_IMAGE}]
    return {"key": key, "frames": frames, "phi": decoded.phi_tokens, "dicom": decoded.dicom}


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS/Windows
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def single_threaded_children():
    """Worker processes started inside get one BLAS/OpenMP thread each (no oversubscription)."""
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update({k: "1" for k in _THREAD_VARS})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pool_context():
    """Where workers come from: a fork server on Linux (started once, modules preloaded, so a pool
    starts in ~0.1 s), spawn elsewhere. Never plain fork: the caller may hold threads (torch)."""
    if "forkserver" in mp.get_all_start_methods() and sys.platform.startswith("linux"):
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["llcm.data.build", "PIL.Image"])  # DICOM/NIfTI readers load lazily
        return ctx
    return mp.get_context("spawn")


IN_FLIGHT = 8  # files queued per worker: enough that no worker waits while the oldest result is collected


def run_tasks(tasks: list[tuple], workers: int, on_result, progress=None) -> None:
    """Run `process_item` over tasks (results in task order), inline or in worker processes.

    A worker that dies (SIGKILL, the OOM killer) breaks the pool: the files then in flight are run
    again one at a time, each in a pool of its own, so the one that kills its process is recorded as
    `decoder_process_died` and the build goes on with a fresh pool; it never waits on a dead worker."""
    if workers <= 1 or len(tasks) < 16:
        for task in tasks:
            _deliver(process_item(task), on_result, progress)
        return
    pending = list(tasks)
    with single_threaded_children():
        while pending:
            pending = _run_pool(pending, workers, on_result, progress)
            if pending:  # the pool broke: the files in flight, one by one
                suspects, pending = pending[: IN_FLIGHT * workers], pending[IN_FLIGHT * workers:]
                for task in suspects:
                    _run_pool([task], 1, on_result, progress, died=True)


def _deliver(rec: dict, on_result, progress) -> None:
    on_result(rec)
    if progress is not None:
        progress.update(1)


def _run_pool(tasks: list[tuple], workers: int, on_result, progress, died: bool = False) -> list[tuple]:
    """Run tasks in a process pool, at most IN_FLIGHT x workers in flight, results in order; returns the tasks
    without a result when a worker died (all of them from the oldest in flight), or [] when done.
    With `died`, a lost task is recorded as `decoder_process_died` instead of returned."""
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(workers, mp_context=pool_context()) as pool:
        flight: deque = deque()
        i = 0
        try:
            while i < len(tasks) or flight:
                while i < len(tasks) and len(flight) < IN_FLIGHT * workers:
                    flight.append(pool.submit(process_item, tasks[i]))
                    i += 1
                _deliver(flight[0].result(), on_result, progress)
                flight.popleft()
        except BrokenProcessPool:
            lost = tasks[i - len(flight):]
            if not died:
                return lost
            for task in lost:
                _deliver({"key": task[0], "frames": [{"i": 0, "reject": WORKER_DIED}], "phi": []}, on_result,
                         progress)
    return []


# ----------------------------------------------------------------------------------------------
# Journal (resume)


def _load_journal(path: Path) -> dict[str, dict]:
    """Complete journal lines by key; a torn last line (killed mid-write) is dropped and rewritten."""
    if not path.exists():
        return {}
    good, records, dirty = [], {}, False
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            records[rec["key"]] = rec
            good.append(line)
        except (ValueError, KeyError, TypeError):
            dirty = True
    if dirty:
        atomic_write(path, b"".join(g + b"\n" for g in good))
    return records


# ----------------------------------------------------------------------------------------------
# Assembly: labels, duplicates, classes, splits


@dataclass
class Entry:
    """A kept frame."""

    item: sources.Item
    frame: dict
    class_id: str

    @property
    def hash(self) -> str:
        return self.frame["hash"]


@dataclass
class Assembly:
    entries: list[Entry]
    infos: dict[str, ClassInfo]  # class id -> info
    keys_of: dict[str, list[str]]  # class id -> class keys merged into it
    rejections: Counter
    by_source: dict[int, Counter]
    by_class: dict[str, Counter]
    duplicates: Counter
    frames_decoded: int


def _phi_hit(class_key: str, phi_hashes: set[str], vocabulary_words: set[str]) -> bool:
    if not phi_hashes:
        return False
    for tok in readers.phi_word_tokens(class_key):
        if tok in vocabulary_words:
            continue
        if readers.token_hash(tok) in phi_hashes:
            return True
    return False


def assemble(items: list[sources.Item], records: dict[str, dict], specs: list[sources.SourceSpec],
             taxonomy: Taxonomy, opts: BuildOptions, phi_hashes: set[str] = frozenset()) -> Assembly:
    """Label checks then exact and near de-duplication, in canonical order (first one wins)."""
    vocab_words = set(taxonomy.ignore) | {w for phrase in taxonomy.phrases for w in phrase}
    infos_by_key: dict[str, ClassInfo] = {}
    phi_by_key: dict[str, bool] = {}
    for item in items:
        if item.class_key and item.class_key not in infos_by_key:
            infos_by_key[item.class_key] = taxonomy.resolve(item.class_key, item.label, item.context)
            phi_by_key[item.class_key] = _phi_hit(item.class_key, phi_hashes, vocab_words)

    rejections: Counter = Counter()
    by_source: dict[int, Counter] = defaultdict(Counter)
    by_class: dict[str, Counter] = defaultdict(Counter)
    duplicates: Counter = Counter()
    exact: dict[str, Entry] = {}
    near = cleaning.NearDuplicateIndex(opts.near_duplicate_distance)
    entries: list[Entry] = []
    infos: dict[str, ClassInfo] = {}
    keys_of: dict[str, list[str]] = defaultdict(list)
    frames_decoded = 0

    def reject(reason: str, item: sources.Item, class_id: str | None) -> None:
        rejections[reason] += 1
        by_source[item.source][reason] += 1
        if class_id:
            by_class[class_id][reason] += 1

    for item in items:
        rec = records[item.key]
        info = infos_by_key.get(item.class_key) if item.class_key else None
        cid = info.id if info else None
        for fr in rec["frames"]:
            if "reject" in fr:
                reject(fr["reject"], item, cid)
                continue
            frames_decoded += 1
            if info is None:
                reject(sources.NO_LABEL, item, None)
                continue
            if phi_by_key[item.class_key]:
                reject("label_contains_phi", item, None)
                continue
            if info.excluded:
                reject("excluded_class", item, cid)
                continue
            if opts.require_mapped and not info.mapped:
                reject("unmapped_class", item, cid)
                continue
            entry = Entry(item=item, frame=fr, class_id=cid)
            first = exact.get(fr["hash"])
            reason = cleaning.EXACT_DUPLICATE if first is not None else None
            if first is None:
                first = near.find(int(fr["phash"], 16))
                reason = cleaning.NEAR_DUPLICATE if first is not None else None
            if first is not None:
                reject(reason, item, cid)
                if first.item.source != item.source:
                    duplicates["cross_source"] += 1
                if first.class_id != cid:
                    duplicates["class_conflicts"] += 1
                continue
            exact[fr["hash"]] = entry
            near.add(int(fr["phash"], 16), entry)
            entries.append(entry)
            if cid not in infos:
                infos[cid] = info
            if item.class_key not in keys_of[cid]:
                keys_of[cid].append(item.class_key)
    # classes that lost every image still appear in the report
    for info in infos_by_key.values():
        if info.id not in infos and not phi_by_key[info.key]:
            infos.setdefault(info.id, info)
            if info.key not in keys_of[info.id]:
                keys_of[info.id].append(info.key)
    duplicates["exact"] = rejections[cleaning.EXACT_DUPLICATE]
    duplicates["near"] = rejections[cleaning.NEAR_DUPLICATE]
    return Assembly(entries, infos, dict(keys_of), rejections, dict(by_source), dict(by_class), duplicates,
                    frames_decoded)


def _class_seed(seed: int, class_id: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(hashlib.sha256(class_id.encode()).hexdigest()[:8], 16)])


def choose_holdout(class_ids: list[str], patterns: tuple[str, ...], count: int, seed: int) -> list[str]:
    """Classes matching a pattern (glob on the class id), plus `count` more drawn with the seed."""
    held = [c for c in class_ids if any(fnmatch.fnmatchcase(c, p) or c == p for p in patterns)]
    rest = [c for c in class_ids if c not in held]
    if count > 0 and rest:
        rng = np.random.default_rng([int(seed), 7919])
        picks = rng.permutation(len(rest))[: min(count, len(rest))]
        held += [rest[i] for i in sorted(picks)]
    return sorted(held)


def n_test_images(n: int, cap: int, fraction: float) -> int:
    """Test images of a class of `n`: the cap's excess, and at least `fraction` of the class (rounded,
    at least one when n >= 2, never the last train image). fraction 0 is the paper's rule."""
    excess = n - cap if cap and cap > 0 else 0
    held = min(n - 1, max(1, int(n * fraction + 0.5))) if fraction > 0 and n >= 2 else 0
    return max(excess, held)


def split_classes(entries: list[Entry], cap: int, seed: int, held_out: list[str],
                  test_fraction: float = 0.0) -> dict[str, dict[str, list[Entry]]]:
    """class id -> {"train": [...], "test": [...]}: seeded permutation, the first ones to train,
    the last `n_test_images` to test. Depends on content hashes only, never on file names or listing order."""
    groups: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        groups[e.class_id].append(e)
    out = {}
    for cid in sorted(groups):
        es = sorted(groups[cid], key=lambda e: e.hash)
        order = _class_seed(seed, cid).permutation(len(es))
        es = [es[i] for i in order]
        if cid in held_out:
            out[cid] = {"train": [], "test": es}
        else:
            n_train = len(es) - n_test_images(len(es), cap, test_fraction)
            out[cid] = {"train": es[:n_train], "test": es[n_train:]}
    return out


# ----------------------------------------------------------------------------------------------
# The build


def _check_paths(specs: list[sources.SourceSpec], out: Path) -> None:
    for spec in specs:
        src = spec.path
        if src == out or src.is_relative_to(out) or (src.is_dir() and out.is_relative_to(src)):
            raise UserError(f"the output folder and source {spec.name!r} must not contain each other")


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output exists and is not a folder: {out}")
    out.mkdir(parents=True, exist_ok=True)
    entries = [p.name for p in out.iterdir()]
    ours = {CACHE_DIR, *TEXT_OUTPUTS, *SPLITS}
    if entries and not ((out / "build.json").exists() or (out / CACHE_DIR).exists()):
        raise UserError(f"output folder {out} is not empty and is not an llcm dataset; choose an empty folder")
    if (out / "build.json").exists() or (out / CACHE_DIR).exists():
        foreign = sorted(set(entries) - ours)
        if foreign:
            raise UserError(f"output folder {out} holds files the builder did not write ({foreign[0]}); "
                            "choose an empty folder")


def _wipe_outputs(out: Path) -> None:
    for name in SPLITS:
        if (out / name).exists():
            shutil.rmtree(out / name)
    for name in TEXT_OUTPUTS:
        (out / name).unlink(missing_ok=True)


def _outputs_intact(out: Path) -> bool:
    for split in SPLITS:
        meta = out / split / "metadata.jsonl"
        if not meta.exists():
            continue
        try:
            rows = read_manifest(meta)
        except UserError:
            return False  # a damaged or tampered manifest: rebuilt
        if not all((out / split / row["file_name"]).exists() for row in rows):
            return False
    return (out / "stats.json").exists() and (out / "card.md").exists()


def build_dataset(sources_in, out, **options) -> dict:
    """Build a dataset from `sources_in` (folders, archives, "NAME=PATH", or dicts) into `out`.

    Options are the fields of `BuildOptions`. Returns the statistics written to stats.json, plus a
    "run" entry (work done in this call, elapsed time) that is not written."""
    t0 = time.perf_counter()
    unknown = set(options) - {f.name for f in dataclasses.fields(BuildOptions)}
    if unknown:
        raise TypeError(f"unknown build options: {', '.join(sorted(unknown))}")
    if "holdout" in options:
        options["holdout"] = tuple(options["holdout"] or ())
    opts = BuildOptions(**options)
    opts.validate()
    specs = sources.parse_sources(sources_in, opts.licences)
    out = Path(out).expanduser().resolve()
    _check_paths(specs, out)
    _prepare_out(out)
    cache = out / CACHE_DIR
    cache.mkdir(exist_ok=True)
    mapping = load_mapping(opts.mapping)
    taxonomy = Taxonomy(mapping, opts.prompt_template)

    # 1. sources -> candidate items
    roots, unsafe_counts, scans = [], [], []  # unsafe_counts: per source, reason -> archive members refused
    for i, spec in enumerate(specs):
        refused = {}
        if spec.is_archive:
            dest = cache / "extract" / f"{i}-{spec.name}"
            try:
                info = sources.extract_archive(spec.path, dest, max_bytes=opts.max_archive_bytes)
                roots.append(dest)
                refused = {sources.UNSAFE_MEMBER: info["unsafe"], sources.MEMBER_TOO_LARGE: info["too_large"]}
            except UserError:  # a corrupt archive is one unreadable input, not the end of the build
                roots.append(None)
        else:
            roots.append(spec.path)
        unsafe_counts.append({k: n for k, n in refused.items() if n})
    for i, (spec, root) in enumerate(zip(specs, roots)):
        if root is None:
            scan = sources.ScanResult()
            scan.rejected[readers.UNREADABLE] += 1
        else:
            scan = sources.scan_source(i, spec, root, path_column=opts.path_column,
                                       label_column=opts.label_column, include_mtime=not spec.is_archive)
        scans.append(scan)
    items = [it for scan in scans for it in scan.items]

    fingerprint = hashlib.sha256(json.dumps({
        "version": BUILDER_VERSION,
        "options": opts.output_fields(),
        "mapping": mapping,
        "sources": [
            {"name": s.name, "licence": s.licence, "archive": sources.archive_fingerprint(s.path) if s.is_archive else "",
             "unsafe": u, "rejected": dict(sc.rejected), "items": [(it.key, it.class_key) for it in sc.items]}
            for s, u, sc in zip(specs, unsafe_counts, scans)
        ],
    }, sort_keys=True).encode()).hexdigest()

    build_json = out / "build.json"
    if build_json.exists() and not opts.force:
        try:
            done = json.loads(build_json.read_text())
        except ValueError:
            done = {}
        if done.get("fingerprint") == fingerprint and _outputs_intact(out):
            stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
            if not opts.keep_cache:
                shutil.rmtree(cache, ignore_errors=True)
            stats["run"] = {"up_to_date": True, "decoded_files": 0, "reused_files": len(items),
                            "elapsed_s": round(time.perf_counter() - t0, 3)}
            return stats

    state_path = cache / "state.json"
    journal_path = cache / "journal.jsonl"
    objects = cache / "objects"
    try:
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
    except ValueError:
        state = {}
    if state.get("fingerprint") != fingerprint or opts.force:
        # a different build (or --force): start over; nothing of the old outputs is trusted
        journal_path.unlink(missing_ok=True)
        if objects.exists():
            shutil.rmtree(objects)
        _wipe_outputs(out)
        atomic_write(state_path, _json_bytes({"fingerprint": fingerprint}))
    objects.mkdir(exist_ok=True)
    crash = _CrashHook()

    # 2. decode (resumable)
    records = _load_journal(journal_path)
    todo = [it for it in items if it.key not in records]
    # DICOM files decoded by an interrupted run: re-read their headers for the label audit
    phi_hashes: set[str] = set()
    for it in items:
        if records.get(it.key, {}).get("dicom"):
            phi_hashes.update(readers.read_dicom_phi(it.path))
    reused = len(items) - len(todo)
    wopts = opts.worker_options()
    tasks = [(it.key, str(it.path), wopts, str(objects)) for it in todo]
    workers = opts.workers or _default_workers()
    progress = None
    if opts.progress and items:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(items), initial=reused, desc="llcm data: decoding", unit="file",
                        dynamic_ncols=True)
    with open(journal_path, "ab") as journal:

        def on_result(rec: dict) -> None:
            phi_hashes.update(rec.pop("phi", ()))  # identifier hashes stay in memory, never on disk
            records[rec["key"]] = rec
            journal.write(json.dumps(rec, sort_keys=True).encode() + b"\n")
            journal.flush()
            crash.tick()

        try:
            run_tasks(tasks, workers, on_result, progress)
        finally:
            if progress is not None:
                progress.close()

    # 3-4. labels, duplicates, classes, splits
    asm = assemble(items, records, specs, taxonomy, opts, phi_hashes)
    for i, refused in enumerate(unsafe_counts):
        for reason, n in refused.items():
            asm.rejections[reason] += n
            asm.by_source.setdefault(i, Counter())[reason] += n
    for i, scan in enumerate(scans):
        for reason, n in scan.rejected.items():
            asm.rejections[reason] += n
            asm.by_source.setdefault(i, Counter())[reason] += n
    held = choose_holdout(sorted(asm.infos), opts.holdout, opts.holdout_count, opts.seed)
    splits = split_classes(asm.entries, opts.cap, opts.seed, held, opts.test_fraction)

    # 5. place images, then the text outputs
    ext = opts.image_format
    dirs: dict[str, str] = {}
    for cid in sorted(asm.infos):
        base = class_dir_name(cid)
        name, n = base, 2
        while name in dirs.values():
            name, n = f"{base}-{n}", n + 1
        dirs[cid] = name
    plan: list[tuple[str, str, Entry]] = []  # (split, file_name relative to split, entry)
    for cid, parts in splits.items():
        for split in SPLITS:
            used: set[str] = set()
            for e in parts[split]:
                stem = e.hash[:16] if e.hash[:16] not in used else e.hash
                used.add(stem)
                plan.append((split, f"{dirs[cid]}/{stem}.{ext}", e))
    plan.sort(key=lambda p: (p[0], p[1]))
    planned = {f"{s}/{f}" for s, f, _ in plan}
    made: set[Path] = set()
    for split, fname, e in plan:
        dst = out / split / fname
        if dst.exists():
            continue
        if dst.parent not in made:
            dst.parent.mkdir(parents=True, exist_ok=True)
            made.add(dst.parent)
        # each kept content hash is placed once: the cached object is renamed into place (atomic)
        try:
            os.replace(objects / f"{e.hash}.{ext}", dst)
        except FileNotFoundError:
            raise UserError(f"the build cache in {cache} is damaged; run again with --force") from None
        crash.tick()
    for split in SPLITS:  # anything else under train/ test/ is stale (or a torn temp file)
        root = out / split
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            for fname in filenames:
                rel = (Path(dirpath) / fname).relative_to(out).as_posix()
                if rel not in planned and rel != f"{split}/metadata.jsonl":
                    os.unlink(os.path.join(dirpath, fname))
            if dirpath != str(root) and not os.listdir(dirpath):
                os.rmdir(dirpath)

    from llcm.data.report import make_stats, render_card, metadata_rows

    for split in SPLITS:  # written even when empty: readers (llcm evaluate) find an empty split, not none
        rows = metadata_rows(plan, split, asm, specs, held)
        (out / split).mkdir(exist_ok=True)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        atomic_write(out / split / "metadata.jsonl", data)
    stats = make_stats(fingerprint, opts, specs, scans, asm, splits, held, dirs)
    atomic_write(out / "stats.json", _json_bytes(stats))
    atomic_write(out / "card.md", render_card(stats, REASONS).encode("utf-8"))
    atomic_write(build_json, _json_bytes({"builder_version": BUILDER_VERSION, "fingerprint": fingerprint,
                                          "options": opts.output_fields(),
                                          "sources": [s.name for s in specs]}))
    if not opts.keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    stats["run"] = {"up_to_date": False, "decoded_files": len(todo), "reused_files": reused,
                    "elapsed_s": round(time.perf_counter() - t0, 3)}
    return stats


def read_manifest(meta: Path) -> list[dict]:
    """The one reader of a `metadata.jsonl`: JSON objects whose `file_name` is a relative path inside
    the split folder (no absolute path, `..` or backslash); anything else is a UserError."""
    root = meta.parent
    rows = []
    try:
        lines = meta.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{meta} is not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise UserError(f"{meta}, line {n}: not valid JSON") from None
        name = row.get("file_name") if isinstance(row, dict) else None
        if not isinstance(name, str) or not name:
            raise UserError(f"{meta}, line {n}: a row needs a file_name")
        rel = PurePosixPath(name)
        if (rel.is_absolute() or "\\" in name or ".." in rel.parts
                or not os.path.abspath(root / rel).startswith(os.path.abspath(root) + os.sep)):
            raise UserError(f"{meta}, line {n}: file_name {name!r} points outside the dataset")
        rows.append(row)
    return rows


def read_split(directory, split: str = "train") -> list[dict]:
    """Rows of `<directory>/<split>/metadata.jsonl`, each with an absolute `path` added."""
    root = Path(directory).expanduser().resolve() / split
    meta = root / "metadata.jsonl"
    if not meta.exists():
        if not (Path(directory) / "build.json").exists():
            raise UserError(f"{directory} is not an llcm dataset (no build.json); run `llcm data build` first")
        return []
    rows = read_manifest(meta)
    for row in rows:
        row["path"] = str(root / row["file_name"])
    return rows
