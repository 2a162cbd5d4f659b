"""Train on synthetic, test on real (TSTR): how useful is a synthetic dataset for training a classifier?

    res = utility("data/mini", "runs/synth", seeds=(0, 1, 2))
    res["rows"]["synthetic"]["mean_accuracy"]      # {"mean": 0.83, "std": 0.01, "per_seed": [...]}

The same small CNN as the classifier check (llcm.evaluation.classifier, the same recipe and epochs) is trained
on three training sets and tested on the real dataset's test split:

    real             the real train split
    synthetic        synthetic images only, as many per class as the real train split has (the first n of the
                     class in metadata order; a class with fewer synthetic images uses all of them: the counts
                     are recorded)
    real+synthetic   both of the above

Classes are matched by their prompt `text` (what the model was asked for), not by folder or class name; classes
in only one of the datasets are listed and left out of all three rows, so the rows share one label set and one
test set. Accuracy is balanced: the mean over classes of the per-class accuracy on the real test images. Each
row is trained once per seed (the seed fixes the initial weights and the batch order); mean and standard
deviation (n - 1) over the seeds. Every image is read once, resized to the classifier's input size and kept in
memory for all trainings. Synthetic files may be PNG/JPEG (read like every other image in llcm.evaluation) or
DICOM / NIfTI single slices (read by llcm.data.readers; a row with a `slice` field picks that slice of a volume).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from llcm.errors import UserError
from llcm.fileio import record_name

FORMAT = "llcm-utility-v1"
ROWS = ("real", "synthetic", "real+synthetic")
ROW_MEANING = {
    "real": "the real train split",
    "synthetic": "synthetic images only, as many per class as the real train split",
    "real+synthetic": "the real train split plus those synthetic images",
}


@dataclass
class UtilityPlan:
    """What the utility will train and test on: matched classes and the dataset rows of each set (no pixels)."""

    real_dir: str
    synthetic_dir: str
    train_split: str
    test_split: str
    classes: list[dict]  # text, real_class, synthetic_class, real_train, real_test, synthetic_available/_used
    real_train: list[dict]
    real_test: list[dict]
    synthetic: list[dict]  # the synthetic rows used (first n per class)
    only_real: list[str] = field(default_factory=list)
    only_synthetic: list[str] = field(default_factory=list)
    incomplete_real: dict[str, str] = field(default_factory=dict)  # text -> which real split lacks it
    synthetic_source: dict = field(default_factory=dict)


def _text(row: dict) -> str:
    return str(row.get("text") or "").strip()


def _rows(directory: str | Path, split: str, what: str) -> list[dict]:
    from llcm.data import read_split

    d = Path(directory).expanduser()
    if not d.is_dir():
        raise UserError(f"{what} dataset {directory} does not exist")
    if not (d / split / "metadata.jsonl").is_file():
        raise UserError(f"{what} dataset {directory} has no {split}/metadata.jsonl (expected the layout of "
                        "`llcm data build` / `llcm synthesize`: DIR/train/metadata.jsonl beside the images)")
    rows = read_split(d, split)
    if not rows:
        raise UserError(f"{what} dataset {directory}: {split}/metadata.jsonl lists no images")
    return rows


def _by_text(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        t = _text(r)
        if t:  # a row without a prompt cannot be matched
            out.setdefault(t, []).append(r)
    return out


def _class_name(rows: list[dict]) -> str:
    """The most common `class` of rows that share a prompt (their text when they have none)."""
    return Counter(str(r.get("class") or _text(r)) for r in rows).most_common(1)[0][0]


def _short(texts: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(repr(t) for t in list(texts)[:n])
    return shown + (f" and {len(texts) - n} more" if len(texts) > n else "") if texts else "none"


def plan_utility(real_dir: str | Path, synthetic_dir: str | Path, train_split: str = "train",
                 test_split: str = "test") -> UtilityPlan:
    """Read both datasets' metadata, match classes by prompt text and pick the synthetic rows; no pixels are read.
    Raises UserError for a missing split, fewer than two common classes or a listed file that is missing."""
    real_train = _by_text(_rows(real_dir, train_split, "real"))
    real_test = _by_text(_rows(real_dir, test_split, "real"))
    synth_rows = _rows(synthetic_dir, "train", "synthetic")
    synth = _by_text(synth_rows)
    real_texts = sorted(set(real_train) | set(real_test))
    common = sorted(t for t in synth if t in real_train and t in real_test)
    if not common:
        raise UserError(f"no class in common between the real dataset {record_name(real_dir)} and the synthetic "
                        f"dataset {record_name(synthetic_dir)} (classes are matched by their prompt text): real "
                        f"has {_short(real_texts)}; synthetic has {_short(sorted(synth))}")
    if len(common) < 2:
        raise UserError(f"only one class in common between the real and the synthetic dataset ({common[0]!r}); "
                        "a classifier needs at least 2")
    common.sort(key=lambda t: (_class_name(real_train[t]), t))  # the order of the rest of the report: by class
    classes, used = [], []
    for t in common:
        n = len(real_train[t])
        pick = synth[t][:n]  # metadata (file) order: the first n of the class
        used += pick
        classes.append({"text": t, "real_class": _class_name(real_train[t]), "synthetic_class": _class_name(synth[t]),
                        "real_train": n, "real_test": len(real_test[t]), "synthetic_available": len(synth[t]),
                        "synthetic_used": len(pick)})
    keep = set(common)
    plan = UtilityPlan(
        real_dir=str(real_dir), synthetic_dir=str(synthetic_dir), train_split=train_split, test_split=test_split,
        classes=classes,
        real_train=[r for t in common for r in real_train[t]], real_test=[r for t in common for r in real_test[t]],
        synthetic=used,
        only_real=[t for t in real_texts if t not in synth],
        only_synthetic=sorted(t for t in synth if t not in real_train and t not in real_test),
        incomplete_real={t: f"no real {test_split} images" if t in real_train else f"no real {train_split} images"
                         for t in synth if t not in keep and (t in real_train or t in real_test)},
        synthetic_source=_source(synth_rows))
    missing = [r["path"] for r in plan.real_train + plan.real_test + plan.synthetic if not Path(r["path"]).is_file()]
    if missing:
        raise UserError(f"{len(missing)} image file(s) listed in metadata.jsonl are missing, e.g. {missing[0]}")
    return plan


def _source(rows: list[dict]) -> dict:
    """How the synthetic set was made, as its rows record it (llcm synthesize: seed, steps, w, model_hash)."""
    def values(key: str) -> list:
        return sorted({r[key] for r in rows if isinstance(r.get(key), (str, int, float))}, key=str)

    return {"rows": len(rows), "marked_synthetic": sum(1 for r in rows if r.get("synthetic") is True),
            "without_text": sum(1 for r in rows if not _text(r)),
            "model_hash": values("model_hash")[:8], "steps": values("steps")[:8], "w": values("w")[:8]}


# ----------------------------------------------------------------------------------------------
# Pixels


def _frames(path: Path) -> list | None:
    """The frames of a DICOM or NIfTI file (llcm.data.readers; no NIfTI slice dropped as empty), None for others."""
    from llcm.data import readers

    with open(path, "rb") as fh:
        kind = readers.file_kind(path, fh.read(512))
    if kind not in ("dicom", "nifti"):
        return None
    try:
        return (readers.read_dicom(path) if kind == "dicom" else readers.read_nifti(path, empty_fraction=0.0)).frames
    except readers.Rejected as exc:
        raise UserError(f"{path}: cannot read it as {kind.upper() if kind == 'dicom' else 'NIfTI'} ({exc})") from None


def _pick(frames: list, slice_index: int | None, path: Path) -> np.ndarray:
    if slice_index is not None:
        frames = [f for f in frames if f.index == int(slice_index)]
        if not frames:
            raise UserError(f"{path}: has no slice/frame {slice_index}")
    elif len(frames) != 1:
        raise UserError(f"{path}: has {len(frames)} slices/frames; its metadata row must name one (`slice`)")
    px = frames[0].pixels
    return np.repeat(px[..., None], 3, axis=-1) if px.ndim == 2 else px


def load_pixels(path: str | Path, slice_index: int | None = None) -> np.ndarray:
    """One image file -> uint8 [H, W, 3]. PNG/JPEG/...: as llcm.evaluation.features.load_image reads them; DICOM
    and NIfTI: through llcm.data.readers. A file with several frames needs `slice_index` (the frame's index: the
    slice of a volume, the frame of a multi-frame DICOM)."""
    from llcm.evaluation.features import load_image

    path = Path(path)
    frames = _frames(path)
    return load_image(path) if frames is None else _pick(frames, slice_index, path)


def load_rows(rows: list[dict], size: int, progress: bool = False, desc: str = "load") -> np.ndarray:
    """uint8 [N, size, size, 3]: each row's image read once and resized as the classifier resizes (bilinear)."""
    from tqdm.auto import tqdm

    from llcm.evaluation.classifier import to_batch
    from llcm.evaluation.features import load_image

    out = np.empty((len(rows), size, size, 3), np.uint8)
    last: tuple[str, list | None] = ("", None)  # a stacked volume's rows follow each other: decode it once
    chunk: list[np.ndarray] = []
    start = 0
    for i, r in enumerate(tqdm(rows, desc=desc, disable=not progress, dynamic_ncols=True)):
        path = Path(r["path"])
        if last[0] != r["path"]:
            last = (r["path"], _frames(path))
        frames = last[1]
        chunk.append(load_image(path) if frames is None else _pick(frames, r.get("slice"), path))
        if len(chunk) == 256 or i == len(rows) - 1:
            out[start:start + len(chunk)] = to_batch(chunk, size).permute(0, 2, 3, 1).numpy()
            start, chunk = start + len(chunk), []
    return out


# ----------------------------------------------------------------------------------------------
# Training and testing


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else None,
            "per_seed": [float(v) for v in a]}


def run_utility(plan: UtilityPlan, seeds: Sequence[int] = (0, 1, 2), epochs: int | None = None,
                settings=None, device="cpu", progress: bool = True) -> dict:
    """Load every image once, train the CNN on each of the three sets once per seed, test on the real test split."""
    import torch
    from tqdm.auto import tqdm

    from llcm.evaluation.classifier import DEFAULT_EPOCHS, ClassifierSettings, train_classifier

    seeds = [int(s) for s in seeds]
    if not seeds:
        raise UserError("the utility needs at least one seed")
    epochs = DEFAULT_EPOCHS if epochs is None else int(epochs)
    if epochs < 1:
        raise UserError(f"the utility's classifiers need at least 1 epoch, got {epochs}")
    s = settings or ClassifierSettings()
    t0 = time.perf_counter()
    x_real = load_rows(plan.real_train, s.size, progress, f"real {plan.train_split}")
    x_test = load_rows(plan.real_test, s.size, progress, f"real {plan.test_split}")
    x_syn = load_rows(plan.synthetic, s.size, progress, "synthetic")
    load_seconds = time.perf_counter() - t0
    y_real, y_syn = [_text(r) for r in plan.real_train], [_text(r) for r in plan.synthetic]
    y_test = np.array([_text(r) for r in plan.real_test])
    texts = [c["text"] for c in plan.classes]
    sets = {"real": (x_real, y_real), "synthetic": (x_syn, y_syn),
            "real+synthetic": (np.concatenate([x_real, x_syn]), y_real + y_syn)}
    rows: dict[str, dict] = {}
    bar = tqdm(total=len(ROWS) * len(seeds), desc="utility", disable=not progress, dynamic_ncols=True)
    for name in ROWS:
        x, y = sets[name]
        per_class: dict[str, list[float]] = {t: [] for t in texts}
        balanced, seconds, steps = [], [], None
        for seed in seeds:
            bar.set_postfix_str(f"{name} seed {seed}")
            clf = train_classifier(x, y, seed=seed, epochs=epochs, settings=s, device=device)
            hit = np.array(clf.predict(x_test)) == y_test
            accs = [float(hit[y_test == t].mean()) for t in texts]
            for t, a in zip(texts, accs):
                per_class[t].append(a)
            balanced.append(float(np.mean(accs)))
            seconds.append(float(clf.info["seconds"]))
            steps = clf.info["steps"]
            bar.update(1)
        counts = Counter(y)
        rows[name] = {"trained_on": ROW_MEANING[name], "n_train": len(y),
                      "train_images": {t: int(counts[t]) for t in texts},
                      "mean_accuracy": _stats(balanced),
                      "per_class": {t: _stats(v) for t, v in per_class.items()},
                      "optimizer_steps": steps, "train_seconds": seconds}
    bar.close()
    short = {c["text"]: [c["real_train"], c["synthetic_used"]] for c in plan.classes
             if c["synthetic_used"] < c["real_train"]}
    return {
        "format": FORMAT,
        "real": record_name(plan.real_dir), "synthetic": record_name(plan.synthetic_dir),
        "train_split": plan.train_split, "test_split": plan.test_split,
        "settings": {"seeds": seeds, "epochs": epochs, "device": str(device),
                     "torch_threads": torch.get_num_threads(),
                     "classifier": {k: v for k, v in dataclasses.asdict(s).items() if k not in ("seed", "epochs")},
                     "accuracy": "balanced: mean over classes of the share of each class's real test images "
                                 "assigned to it; mean and std (n - 1) over the seeds",
                     "synthetic_selection": "per class, the first n synthetic rows in metadata order, n = the "
                                            "real train split's count of that class"},
        "classes": plan.classes,
        "n_test": int(len(y_test)),
        "only_real": plan.only_real, "only_synthetic": plan.only_synthetic,
        "incomplete_real": plan.incomplete_real,
        "synthetic_short": short,  # text -> [wanted, used]: fewer synthetic images than real train images
        "synthetic_source": plan.synthetic_source,
        "rows": rows,
        "seconds": {"load": load_seconds, "total": time.perf_counter() - t0},
    }


def utility(real_dir: str | Path, synthetic_dir: str | Path, seeds: Sequence[int] = (0, 1, 2),
            epochs: int | None = None, progress: bool = True, *, train_split: str = "train",
            test_split: str = "test", settings=None, device="cpu") -> dict:
    """TSTR utility of the synthetic dataset `synthetic_dir` (its train split) for the real dataset `real_dir`:
    balanced accuracy on the real test split of a CNN trained on real, synthetic and real + synthetic images,
    per class and overall, mean and std over `seeds`. `epochs` defaults to the classifier check's
    (llcm.evaluation.classifier.DEFAULT_EPOCHS); `settings` (a ClassifierSettings) changes the CNN or its input
    size. Returns a JSON-serialisable dict (``format`` = "llcm-utility-v1"; see the module docstring)."""
    plan = plan_utility(real_dir, synthetic_dir, train_split=train_split, test_split=test_split)
    return run_utility(plan, seeds=seeds, epochs=epochs, settings=settings, device=device, progress=progress)


__all__ = ["utility", "plan_utility", "run_utility", "load_pixels", "load_rows", "UtilityPlan", "FORMAT", "ROWS"]
