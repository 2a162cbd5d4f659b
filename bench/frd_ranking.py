"""FRD (llcm radiomics features) beside the FIDs of an `llcm evaluate` folder: do the two rank runs alike?

    PYTHONPATH=src python bench/frd_ranking.py EVAL_DIR [--data DATASET] [--json OUT.json]

Reads EVAL_DIR/results.json (its runs, classes, per-class count and FIDs) and each run's images
(images/<model>/<run>/<class>/<seed>.png, or <folder>/<steps>/<class>/ for an `images` run), plus the real
test split of DATASET (default: the `data` recorded in results.json), extracts radiomics features
(llcm.evaluation.radiomics) once per image and prints, per run, FID (from results.json, with its extractor's
name) and FRD overall, then every (run, class) cell, then the Spearman rank correlation between FID and
FRD across runs and across (run, class) cells. FRD per class z-scores with that class's real images.
The last column names the feature with the largest z-scored mean shift and its share of FD's mean term: FRD
z-scores with the real set's std, so a feature nearly constant in the real images (a black background's
10th percentile) can set the whole value. FRD here is llcm's radiomics subset, NOT frd-score's FRD (see the module docstring of
llcm.evaluation.radiomics); FID and FRD are on different scales and only their rankings are compared.
A folder evaluated with FRD (`llcm evaluate` without --no-frd) already holds FRD in results.json (metrics/frd,
per_class/<class>/frd) and the radiomics features in its caches (cache/real-<split>.radiomics.npz,
features/<run>.radiomics.npz): both are read instead of recomputed (the caches keep float32 features); an older
folder is measured from its images as before.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import stats

from llcm.data import read_split
from llcm.evaluation.evaluate import _safe, class_of
from llcm.evaluation.features import IMAGE_SUFFIXES, extract_features
from llcm.evaluation.metrics import load_stats
from llcm.evaluation.radiomics import RadiomicsExtractor, frd


def numeric_sorted(files):
    return sorted(files, key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0, p.name))


def run_files(eval_dir: Path, run: dict, classes: list[str], per_class: int) -> list[tuple[str, Path]]:
    """The images `llcm evaluate` measured for `run`: the first per_class files of each class folder."""
    base = eval_dir / run["images_dir"]
    if run.get("kind") == "images":
        base = base / str(run["steps"])
    out = []
    for c in classes:
        folder = base / c if (base / c).is_dir() else base / _safe(c)
        files = numeric_sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        out += [(c, p) for p in files[:per_class]]
    return out


def top_feature(real: np.ndarray, fake: np.ndarray, names: list[str]) -> tuple[str, float]:
    """The feature with the largest z-scored mean difference, and its share of FD's mean term
    (a share near 1 says one feature, often one nearly constant in the real set, sets the FRD)."""
    mu, sd = real.mean(axis=0), real.std(axis=0)
    keep = sd > 1e-10 * np.maximum(np.abs(mu), 1.0)
    z2 = np.where(keep, ((fake.mean(axis=0) - mu) / np.where(keep, sd, 1.0)) ** 2, 0.0)
    i = int(np.argmax(z2))
    return names[i], float(z2[i] / z2.sum()) if z2.sum() > 0 else 0.0


def cached_or_extracted(ex: RadiomicsExtractor, cache: Path, paths: list) -> tuple[np.ndarray, bool]:
    """Radiomics features of `paths`: from an `llcm evaluate` cache file when it holds as many rows, else extracted."""
    if cache.is_file():
        stats = load_stats(cache)
        if stats.extractor == ex.name and stats.features is not None and len(stats.features) == len(paths):
            return stats.features, True
    return extract_features(ex, paths, progress=False), False


def spearman(a: list[float], b: list[float]) -> str:
    ok = [(x, y) for x, y in zip(a, b) if x is not None and y is not None and np.isfinite(x) and np.isfinite(y)]
    if len(ok) < 3:
        return f"n={len(ok)} (too few)"
    rho, p = stats.spearmanr(*zip(*ok))
    return f"rho = {rho:+.3f} (n = {len(ok)}, p = {p:.3g})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("eval_dir", type=Path)
    ap.add_argument("--data", help="the dataset folder (default: results.json's settings.data)")
    ap.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = ap.parse_args()

    res = json.loads((args.eval_dir / "results.json").read_text())
    settings = res["settings"]
    data = args.data or settings["data"]
    classes = [c["name"] for c in res["classes"]]
    fid_name = res["extractor"]["name"]
    ex = RadiomicsExtractor()
    recorded = bool(res.get("frd")) and not res["frd"].get("skipped") and all("frd" in r["metrics"]
                                                                               for r in res["runs"])
    split = settings.get("test_split", "test")

    t0 = time.perf_counter()
    rows = [r for r in read_split(data, split) if class_of(r) in set(classes)]
    real, from_cache = cached_or_extracted(ex, args.eval_dir / "cache" / f"real-{_safe(split)}.{ex.name}.npz",
                                           [r["path"] for r in rows])
    n_cached = len(rows) if from_cache else 0
    real_labels = np.array([class_of(r) for r in rows])
    n_images = len(rows)
    print(f"real: {len(rows)} images of {settings.get('test_split', 'test')!r} in {data}")

    table = []
    for run in res["runs"]:
        files = run_files(args.eval_dir, run, classes, settings["per_class"])
        if len(files) != run["n_images"]:
            print(f"  note: {run['key']}: found {len(files)} images, results.json measured {run['n_images']}")
        feats, from_cache = cached_or_extracted(ex, args.eval_dir / "features" / f"{_safe(run['key'])}.{ex.name}.npz",
                                                [p for _, p in files])
        labels = np.array([c for c, _ in files])
        n_images += len(files)
        n_cached += len(files) if from_cache else 0
        cells = {}
        for c in classes:
            r, f = real[real_labels == c], feats[labels == c]
            pc = (run.get("per_class") or {}).get(c)
            enough = len(r) >= 2 and len(f) >= 2
            top, share = top_feature(r, f, ex.feature_names) if enough else ("-", 0.0)
            mine = pc.get("frd") if recorded and pc else (frd(r, f) if enough else None)
            cells[c] = {"fid": pc["fid"] if pc else None, "frd": mine,
                        "n_real": len(r), "n_fake": len(f), "top_feature": top, "top_share": share}
        top, share = top_feature(real, feats, ex.feature_names)
        mine = run["metrics"]["frd"] if recorded else frd(real, feats)
        mine = float("nan") if mine is None else mine  # results.json: None = not finite
        table.append({"key": run["key"], "n": len(files), "fid": run["metrics"]["fid"], "frd": mine,
                      "top_feature": top, "top_share": share, "per_class": cells})
    seconds = time.perf_counter() - t0

    print(f"radiomics features of {n_images} images ({n_cached} from the evaluation's caches) + FRDs: {seconds:.1f} s"
          + ("; FRD values from results.json" if recorded else ""))
    print(f"FID: {fid_name} features ({res['extractor'].get('dim')}-d), from results.json; "
          "FRD: FRD (llcm radiomics features), log scale; lower is better for both\n")
    w = max(len(t["key"]) for t in table) + 2
    print(f"{'run':<{w}}{'n':>5}{'FID':>10}{'FRD':>8}{'rank FID':>10}{'rank FRD':>10}  largest mean shift (share)")
    rank_fid = stats.rankdata([t["fid"] for t in table])
    rank_frd = stats.rankdata([t["frd"] for t in table])
    for t, a, b in zip(table, rank_fid, rank_frd):
        print(f"{t['key']:<{w}}{t['n']:>5}{t['fid']:>10.2f}{t['frd']:>8.3f}{a:>10g}{b:>10g}  "
              f"{t['top_feature']} ({t['top_share']:.2f})")

    cw = max(len(c) for c in classes) + 2
    print(f"\n{'run':<{w}}{'class':<{cw}}{'n real':>7}{'n fake':>7}{'FID':>10}{'FRD':>8}  largest mean shift (share)")
    for t in table:
        for c, cell in t["per_class"].items():
            fid_s = f"{cell['fid']:.2f}" if cell["fid"] is not None else "-"
            frd_s = f"{cell['frd']:.3f}" if cell["frd"] is not None else "-"
            print(f"{t['key']:<{w}}{c:<{cw}}{cell['n_real']:>7}{cell['n_fake']:>7}{fid_s:>10}{frd_s:>8}  "
                  f"{cell['top_feature']} ({cell['top_share']:.2f})")

    cells = [cell for t in table for cell in t["per_class"].values()]
    print("\nSpearman rank correlation, FID vs FRD")
    print(f"  across runs:              {spearman([t['fid'] for t in table], [t['frd'] for t in table])}")
    print(f"  across (run, class) cells: {spearman([c['fid'] for c in cells], [c['frd'] for c in cells])}")
    within = [stats.spearmanr([t["per_class"][c]["fid"] for t in table], [t["per_class"][c]["frd"] for t in table])[0]
              for c in classes if len(table) >= 3 and all(t["per_class"][c]["fid"] is not None for t in table)]
    if within:
        print(f"  across runs within each class: mean rho = {np.nanmean(within):+.3f} over {len(within)} classes")
    if args.json:
        args.json.write_text(json.dumps({"fid_extractor": fid_name, "frd": "FRD (llcm radiomics features)",
                                         "runs": table}, indent=1))


if __name__ == "__main__":
    main()
