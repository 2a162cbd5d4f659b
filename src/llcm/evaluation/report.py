"""results.json -> one self-contained report.html (tables, FID-vs-steps plots, image grids, memorization).

Every number in an HTML table is rendered from the results dict and carries where it came from:
``<td class="num" data-key="/runs/3/metrics/fid" data-value="12.3456...">12.35</td>`` (a JSON Pointer into
results.json and the exact JSON value), so a test can check that no table number is typed in by hand.
Every table caption names the feature extractor (the classifier check's and the utility's tables name
their CNN instead; a table with FRD names its radiomics features too).
Numbers quoted in a sentence carry the same two attributes on a ``<span>``. Plots (matplotlib) and image
grids are embedded as base64 PNG data URIs; the results JSON itself is embedded too.
`write_report(json.load(...), out)` rebuilds the report from results.json and the images on disk.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.8em 0 1.6em}caption{text-align:left;font-weight:600;padding:.3em 0}
td,th{border:1px solid #ccc;padding:.25em .6em}td.num,td.na{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f3f3f3}code,pre{background:#f6f6f6;padding:.1em .3em}pre{padding:.6em;overflow-x:auto}
.warn{background:#fff3cd;border:1px solid #e0c36a;padding:.6em}.note{color:#555;font-size:.9em}
img{max-width:100%;image-rendering:pixelated}
"""


# ----------------------------------------------------------------------------------------------
# Numbers: each cell points into the results


def pointer(*parts: Any) -> str:
    """RFC 6901 JSON Pointer of a path of keys / indices."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def resolve(results: Any, ptr: str) -> Any:
    node = results
    for raw in ptr.split("/")[1:]:
        part = raw.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def esc(v: Any) -> str:
    """Any value as HTML text or a quoted attribute value: formatted by :func:`fmt`, then escaped."""
    return html.escape(fmt(v))


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


class Cells:
    """Renders <td> cells whose numbers come from `results` by JSON Pointer."""

    def __init__(self, results: dict):
        self.results = results

    def num(self, *path: Any) -> str:
        ptr = pointer(*path)
        v = resolve(self.results, ptr)
        key = html.escape(ptr)  # a pointer holds class names and labels: text from the user
        if v is None:
            return f'<td class="na" data-key="{key}">–</td>'
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f'<td data-key="{key}">{esc(v)}</td>'
        return f'<td class="num" data-key="{key}" data-value="{html.escape(json.dumps(v))}">{esc(v)}</td>'

    def span(self, *path: Any) -> str:
        """A number inside a sentence, with the same data-key / data-value as a table cell."""
        ptr = pointer(*path)
        v = resolve(self.results, ptr)
        return (f'<span class="num" data-key="{html.escape(ptr)}" data-value="{html.escape(json.dumps(v))}">'
                f'{esc(v)}</span>')

    def pm(self, *path: Any) -> str:
        """A cell "mean ± std" from a {mean, std} dict at `path`; each number a <span> carrying its source."""
        std = resolve(self.results, pointer(*path, "std"))
        return (f'<td class="pm">{self.span(*path, "mean")}'
                + (f" ± {self.span(*path, 'std')}" if std is not None else "") + "</td>")

    @staticmethod
    def text(v: Any) -> str:
        return f"<td>{esc(v)}</td>"


def table(caption: str, extractor: str | None, header: Sequence[str], rows: Iterable[Sequence[str]],
          note: str = "", frd_extractor: str | None = None) -> str:
    """extractor None: the numbers do not come from the feature extractor (the caption must say where from).
    frd_extractor: the table has an FRD column, computed on these features (named in the caption too)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    cap = html.escape(caption) + (f" — features: <code>{html.escape(extractor)}</code>" if extractor else "")
    if frd_extractor:
        cap += f"; FRD: <code>{html.escape(frd_extractor)}</code>"
    extra = f'<p class="note">{note}</p>' if note else ""
    return f"<table><caption>{cap}</caption><tr>{head}</tr>\n{body}</table>{extra}"


# ----------------------------------------------------------------------------------------------
# Pictures


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _pil_png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _series(results: dict) -> dict[tuple, list[dict]]:
    """Runs grouped into curves: (label, k) -> runs sorted by steps."""
    groups: dict[tuple, list[dict]] = {}
    for r in results["runs"]:
        groups.setdefault((r["label"], r.get("k") if r["kind"] == "consistency" else None), []).append(r)
    return {k: sorted(v, key=lambda r: r["steps"]) for k, v in groups.items()}


def metric_plot(results: dict) -> bytes:
    """FID and KID against steps (log2 axis), one line per model (and grid k), from the results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex = results["extractor"]["name"]
    series = _series(results)
    multi_k = len({k for _, k in series if k is not None}) > 1
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for (label, k), runs in series.items():
        name = f"{label} (k={k})" if multi_k and k is not None else label
        x = [r["steps"] for r in runs]
        for ax, key in zip(axes, ("fid", "kid_mean", "recall")):
            y = [r["metrics"][key] for r in runs]
            ax.plot(x, y, marker="o", label=name)
    ticks = sorted({r["steps"] for r in results["runs"]})
    for ax, title in zip(axes, ("FID", "KID", "recall (k-NN)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.set_title(f"{title} vs steps ({ex})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _load(out: Path, rel: str) -> np.ndarray:
    from llcm.evaluation.features import load_image

    p = Path(rel)
    return load_image(p if p.is_absolute() else out / p)


def labelled_grid(cells: list[list[np.ndarray | None]], row_labels: list[str], col_labels: list[str],
                  tile: int = 96) -> bytes:
    """A PIL grid with row labels on the left and column labels on top."""
    from PIL import Image, ImageDraw

    left, top, pad = 150, 18, 2
    grid = Image.new("RGB", (left + len(col_labels) * (tile + pad), top + len(row_labels) * (tile + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, c in enumerate(col_labels):
        draw.text((left + j * (tile + pad) + 2, 3), c[:16], fill="black")
    for i, r in enumerate(row_labels):
        draw.text((3, top + i * (tile + pad) + tile // 2 - 6), r[:24], fill="black")
        for j, im in enumerate(cells[i]):
            if im is not None:
                grid.paste(Image.fromarray(im).resize((tile, tile), Image.NEAREST if im.shape[0] < tile
                                                      else Image.BICUBIC),
                           (left + j * (tile + pad), top + i * (tile + pad)))
    return _pil_png(grid)


def class_step_grids(results: dict, out: Path) -> list[tuple[str, bytes]]:
    """Per model: classes x steps (first seed of each class), Fig. 1 style."""
    figs = []
    classes = [c["name"] for c in results["classes"]]
    for (label, k), runs in _series(results).items():
        cells = [[_load(out, r["grid"][c][0]) if r["grid"].get(c) else None for r in runs] for c in classes]
        cols = [f"{r['steps']} steps" for r in runs]
        title = f"{label}" + (f", k={k}" if k is not None else "")
        figs.append((title, labelled_grid(cells, classes, cols, tile=96 if len(classes) <= 12 else 64)))
    return figs


def k_grids(results: dict, out: Path) -> list[tuple[str, bytes]]:
    """Fig. 3 style: for each consistency model sampled on several grids k, rows k x columns steps."""
    figs = []
    by_model: dict[str, list[dict]] = {}
    for r in results["runs"]:
        if r["kind"] == "consistency":
            by_model.setdefault(r["label"], []).append(r)
    first = results["classes"][0]["name"] if results["classes"] else None
    for label, runs in by_model.items():
        ks = sorted({r["k"] for r in runs})
        steps = sorted({r["steps"] for r in runs})
        if len(ks) < 2 or first is None:
            continue
        at = {(r["k"], r["steps"]): r for r in runs}
        cells = [[_load(out, at[(k, s)]["grid"][first][0]) if (k, s) in at and at[(k, s)]["grid"].get(first)
                  else None for s in steps] for k in ks]
        figs.append((f"{label}: class {first}, grid k x steps",
                     labelled_grid(cells, [f"k = {k}" for k in ks], [f"{s} steps" for s in steps])))
    return figs


def memorization_pairs(mem: dict, out: Path) -> bytes | None:
    from llcm.evaluation.memorization import compose_pairs

    pairs = mem.get("top_by_ssim") or []
    if not pairs:
        return None
    gen = {p["gen"]: _load(out, p["gen_path"]) for p in pairs}
    train = {p["train"]: _load(out, p["train_path"]) for p in pairs}
    return _pil_png(compose_pairs(gen, train, pairs, size=128, columns=2))


# ----------------------------------------------------------------------------------------------
# Sections


def _img(uri_png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{png_data_uri(uri_png)}">'


def frd_shown(results: dict) -> str | None:
    """The radiomics extractor's name when results hold FRD values (None: --no-frd, skipped, or older results)."""
    f = results.get("frd")
    if not f or f.get("skipped") or not f.get("extractor"):
        return None
    return f["extractor"] if all("frd" in r["metrics"] for r in results["runs"]) else None


def frd_note(results: dict, c: Cells) -> str:
    """One line: what FRD is here, and how its ranking agrees with FID's (numbers from results.json)."""
    f = results.get("frd")
    if not f:
        return ""
    if f.get("skipped"):
        return f"FRD not computed: {html.escape(f['skipped'])}."
    return (f"FRD = FRD (llcm radiomics features): the Fréchet Radiomics Distance recipe on llcm's "
            f"{c.span('frd', 'features')} radiomic features (scikit-image first-order + GLCM; not frd-score's "
            "pyradiomics features, so not comparable with frd-score or published FRDs), z-scored on the real "
            "images, log of the Fréchet distance; lower is better. Spearman rank agreement with FID: "
            f"{c.span('frd', 'rank_agreement_with_fid', 'runs')} across the "
            f"{c.span('frd', 'rank_agreement_with_fid', 'n_runs')} runs, "
            f"{c.span('frd', 'rank_agreement_with_fid', 'cells')} across the "
            f"{c.span('frd', 'rank_agreement_with_fid', 'n_cells')} (run, class) cells (– = fewer than 3 values).")


def table3(results: dict, c: Cells) -> str:
    """Rows = models (x sampler, x k), columns = step counts, cells = FID: the paper's Table 3 layout."""
    ex = results["extractor"]["name"]
    steps = sorted({r["steps"] for r in results["runs"]})
    rows = []
    for (label, k), runs in _series(results).items():
        idx = {r["steps"]: results["runs"].index(r) for r in runs}
        name = label + (f" (k={k})" if k is not None else "")
        rows.append([c.text(name)] + [c.num("runs", idx[s], "metrics", "fid") if s in idx else "<td></td>"
                                      for s in steps])
    header = ["model"] + [f"{s} step" + ("s" if s != 1 else "") for s in steps]
    return table("Table 3: FID by number of sampling steps", ex, header, rows,
                 note="Lower is better. FID is biased upwards at small sample sizes: compare rows with equal "
                      "numbers of images only, and never across feature extractors.")


def runs_table(results: dict, c: Cells) -> str:
    ex = results["extractor"]["name"]
    rad = frd_shown(results)
    header = ["model", "sampler", "distilled with", "k", "steps", "NFE", "w", "images", "FID"] + (
        ["FRD"] if rad else []) + ["KID", "KID std", "precision", "recall", "density", "coverage", "s / image",
                                   "flagged copies"]
    clf = results.get("classifier")
    if clf:
        header += ["classifier accuracy", "accuracy gap (points)"]
    rows = []
    for i, r in enumerate(results["runs"]):
        dw = r.get("distilled_with") or {}
        mem = [c.num("runs", i, "memorization", "share_flagged")] if "memorization" in r else ["<td></td>"]
        if clf:
            mem += [c.num("runs", i, "classifier_accuracy"), c.num("runs", i, "classifier_accuracy_gap_points")]
        rows.append([c.text(r["label"]), c.text(r["sampler"]), c.text(dw.get("solver") or ""),
                     c.num("runs", i, "k"), c.num("runs", i, "steps"), c.num("runs", i, "nfe"), c.num("runs", i, "w"),
                     c.num("runs", i, "n_images"), c.num("runs", i, "metrics", "fid")]
                    + ([c.num("runs", i, "metrics", "frd")] if rad else [])
                    + [c.num("runs", i, "metrics", "kid_mean"), c.num("runs", i, "metrics", "kid_std"),
                     c.num("runs", i, "metrics", "precision"), c.num("runs", i, "metrics", "recall"),
                     c.num("runs", i, "metrics", "density"), c.num("runs", i, "metrics", "coverage"),
                     c.num("runs", i, "seconds_per_image")] + mem)
    return table("All runs: FID" + (", FRD" if rad else "") + ", KID, precision/recall (k-NN manifolds, k=3) "
                 "against the real test split", ex, header, rows, frd_extractor=rad,
                 note=(frd_note(results, c) + " " if results.get("frd") else "") +
                 "NFE = UNet evaluations per image (a CFG step counts 2). s / image = wall time "
                 "of sampling + VAE decoding per image, over every process and session that generated the run. "
                 "flagged copies = share of the run's images flagged by the memorization check." +
                 (" classifier accuracy = share of the run's images that the classifier check's CNN (trained on the "
                  f"{html.escape(clf['train_split'])} split; below) assigns to their prompt's class; on the real "
                  f"test images it scores {c.span('classifier', 'real_test_accuracy')} (class-balanced "
                  f"{c.span('classifier', 'real_test_balanced_accuracy')}); gap = class-balanced real accuracy − "
                  "run accuracy, in points (100 × fraction)." if clf else ""))


def per_class_table(results: dict, c: Cells, metric: str, title: str, extractor: str | None = None,
                    note: str = "") -> str:
    """Rows = runs, columns = classes; `extractor`: the features of `metric` when not the FID extractor's."""
    ex = extractor or results["extractor"]["name"]
    classes = [k["name"] for k in results["classes"]]
    rows = [[c.text(r["key"])] + [c.num("runs", i, "per_class", cl, metric) for cl in classes]
            for i, r in enumerate(results["runs"])]
    counts = [c.text("real test images")] + [c.num("real", "per_class_n", cl) for cl in classes]
    return table(title, ex, ["run"] + classes, rows + [counts],
                 note=(note + " " if note else "") +
                      "Per-class scores use that class's generated images against that class's test images; with "
                      "few images per class they are noisy and biased (FID upwards) — compare runs, not classes.")


def classifier_section(results: dict, c: Cells) -> str:
    clf = results.get("classifier")
    if not clf:
        return "<h2>Classifier check</h2><p>Not run (--no-classifier).</p>"
    classes = [k["name"] for k in results["classes"]]
    parts = ["<h2>Classifier check: do the images show their prompt's class?</h2>",
             f"<p>A classifier trained on the {c.span('classifier', 'n_train')} images of the "
             f"<code>{html.escape(clf['train_split'])}</code> split ({c.span('classifier', 'epochs')} epochs, "
             f"{c.span('classifier', 'seconds')} s to train{', loaded from the cache' if clf.get('cached') else ''}) "
             f"assigns {c.span('classifier', 'real_test_accuracy')} of the "
             f"{c.span('classifier', 'n_test')} real test images to their class (class-balanced: "
             f"{c.span('classifier', 'real_test_balanced_accuracy')}). A run whose accuracy is close to that "
             "produces images the classifier recognizes as well as real ones; a gap of many points means "
             "the images miss what makes their class recognizable (or show another class).</p>",
             f'<p class="note">Classifier: {html.escape(clf["description"])}.</p>']
    if clf.get("missing_from_train"):
        parts.append(f'<p class="warn">Classes with no train images (the classifier cannot name them): '
                     f'{html.escape(", ".join(clf["missing_from_train"]))}.</p>')
    rows = [[c.text("real test images")] + [c.num("classifier", "per_class_real_accuracy", cl) for cl in classes]
            + [c.num("classifier", "real_test_accuracy")]]
    rows += [[c.text(r["key"])] + [c.num("runs", i, "classifier_per_class_accuracy", cl) for cl in classes]
             + [c.num("runs", i, "classifier_accuracy")]
             for i, r in enumerate(results["runs"]) if "classifier_per_class_accuracy" in r]
    parts.append(table("Classifier accuracy by class (a CNN trained on the train split, not the feature extractor)",
                       None, ["images"] + classes + ["all"], rows,
                       note="Share of each class's images assigned to that class. Generated images: the class "
                            "they were prompted for."))
    return "\n".join(parts)


def utility_section(results: dict, c: Cells) -> str:
    """Train on synthetic, test on real (llcm.evaluation.utility): three training sets x seeds, one real test set."""
    u = results.get("utility")
    if not u:
        return ""
    classes = u["classes"]
    seeds = u["settings"]["seeds"]
    parts = ["<h2>Utility: train on synthetic, test on real</h2>",
             f"<p>The same small CNN is trained on the real <code>{html.escape(u['train_split'])}</code> split "
             f"(<code>{html.escape(u['real'])}</code>), on synthetic images only "
             f"(<code>{html.escape(u['synthetic'])}</code>, as many per class as the real split has) and on both, "
             f"once per seed ({len(seeds)} seed{'s' if len(seeds) != 1 else ''}: {esc(seeds)}), and each is tested "
             f"on the {c.span('utility', 'n_test')} real <code>{html.escape(u['test_split'])}</code> images; a "
             "synthetic set as useful as the real data gives the synthetic row the real row's accuracy, and "
             "adding it to the real images should not lower it.</p>"]
    warn = []
    if u.get("only_real"):
        warn.append(f"classes only in the real dataset (left out): {', '.join(u['only_real'])}")
    if u.get("only_synthetic"):
        warn.append(f"classes only in the synthetic dataset (left out): {', '.join(u['only_synthetic'])}")
    if u.get("incomplete_real"):
        warn.append("classes left out for a missing real split: "
                    + ", ".join(f"{t} ({why})" for t, why in u["incomplete_real"].items()))
    if u.get("synthetic_short"):
        warn.append("classes with fewer synthetic images than real train images (all of them used): "
                    + ", ".join(f"{t} ({used} of {want})" for t, (want, used) in u["synthetic_short"].items()))
    if warn:
        parts.append('<p class="warn">' + html.escape("; ".join(warn)) + ".</p>")
    names = [k["real_class"] for k in classes]
    rows = [[c.text(name), c.num("utility", "rows", name, "n_train"), c.pm("utility", "rows", name, "mean_accuracy")]
            + [c.pm("utility", "rows", name, "per_class", k["text"]) for k in classes] for name in u["rows"]]
    parts.append(table("Train on synthetic, test on real: balanced accuracy on the real test split (mean ± std over "
                       "the seeds; CNN classifiers, not the feature extractor)", None,
                       ["trained on", "training images", "balanced accuracy"] + names, rows,
                       note="real = the real train split; synthetic = synthetic images only; real+synthetic = both. "
                            "Balanced accuracy = mean over classes of the share of each class's real test images "
                            f"assigned to it. Classes are matched by prompt. {esc(u['settings']['epochs'])} epochs "
                            "per training (the classifier check's recipe)."))
    count_rows = [[c.text(k["real_class"]), c.text(k["text"])]
                  + [c.num("utility", "classes", i, key)
                     for key in ("real_train", "synthetic_used", "synthetic_available", "real_test")]
                  for i, k in enumerate(classes)]
    parts.append(table("Utility: images per class (the classifier's training and test sets)", None,
                       ["class", "prompt", "real train", "synthetic used", "synthetic available", "real test"],
                       count_rows))
    src = u.get("synthetic_source") or {}
    if src.get("model_hash") or src.get("steps"):
        parts.append(f'<p class="note">The synthetic rows record model hash {html.escape(fmt(src.get("model_hash")))}, '
                     f'steps {html.escape(fmt(src.get("steps")))}, w {html.escape(fmt(src.get("w")))}.</p>')
    return "\n".join(parts)


def memorization_section(results: dict, c: Cells, out: Path) -> str:
    mem = results.get("memorization")
    if not mem:
        return "<h2>Memorization</h2><p>Not run (--no-memorization).</p>"
    ex = results["extractor"]["name"]
    parts = ["<h2>Memorization: nearest training image of every generated image</h2>"]
    if mem["copies_found"]:
        parts.append(f'<p class="warn"><b>Possible copies of training images found:</b> '
                     f'{esc(mem["n_flagged"])} of {esc(mem["n_gen"])} generated images are flagged. '
                     "Inspect the pairs below "
                     "before sharing any synthetic data.</p>")
    summary_rows = [
        [c.text("generated images checked"), c.num("memorization", "n_gen")],
        [c.text(f"training images ({mem['train_split']} split)"), c.num("memorization", "n_train")],
        [c.text("cosine threshold (centred features)"), c.num("memorization", "cos_threshold")],
        [c.text(f"SSIM threshold ({mem['ssim_size']}x{mem['ssim_size']} grey, shifts ≤ {mem['max_shift']} px)"),
         c.num("memorization", "ssim_threshold")],
        [c.text("flagged images"), c.num("memorization", "n_flagged")],
        [c.text("share flagged"), c.num("memorization", "share_flagged")],
        [c.text("share with cosine ≥ threshold"), c.num("memorization", "share_cos_above")],
        [c.text("share with SSIM ≥ threshold"), c.num("memorization", "share_ssim_above")],
        [c.text("generated: max SSIM"), c.num("memorization", "ssim", "max")],
        [c.text("generated: max cosine"), c.num("memorization", "cosine", "max")],
    ]
    if mem.get("baseline", {}).get("n"):
        summary_rows += [
            [c.text("baseline (train vs rest of train): images"), c.num("memorization", "baseline", "n")],
            [c.text("baseline max SSIM"), c.num("memorization", "baseline", "ssim", "max")],
            [c.text("baseline max cosine"), c.num("memorization", "baseline", "cosine", "max")]]
    parts.append(table("Memorization summary", ex, ["", "value"], summary_rows))
    rows = [[c.text(r["key"]), c.num("runs", i, "memorization", "n"), c.num("runs", i, "memorization", "n_flagged"),
             c.num("runs", i, "memorization", "share_flagged"), c.num("runs", i, "memorization", "max_ssim"),
             c.num("runs", i, "memorization", "max_cosine")]
            for i, r in enumerate(results["runs"]) if "memorization" in r]
    parts.append(table("Memorization by run", ex, ["run", "images", "flagged", "share flagged", "max SSIM",
                                                    "max cosine"], rows))
    top = [[c.text(p["run"]), c.text(p["gen_path"]), c.text(os.path.basename(p["train_path"])),
            c.num("memorization", "top_by_ssim", j, "score"), c.num("memorization", "top_by_ssim", j, "flagged")]
           for j, p in enumerate(mem.get("top_by_ssim", []))]
    parts.append(table("Closest pairs by SSIM", ex, ["run", "generated", "training image", "SSIM", "flagged"], top))
    pic = memorization_pairs(mem, out)
    if pic:
        parts.append("<p>Closest pairs, [generated | training]:</p>" + _img(pic, "closest pairs"))
    parts.append('<p class="note">Thresholds (unless given) sit between the training set\'s own largest '
                 "nearest-neighbour score and identity. SSIM catches pixel-level copies, including shifts of a "
                 "pixel or two, but not mirrored, rotated, rescaled or restyled copies; the cosine is only as "
                 "semantic as the extractor. No result here proves the absence of memorization.</p>")
    return "\n".join(parts)


def reproducibility(results: dict, c: Cells) -> str:
    ex = results["extractor"]
    v = results["versions"]
    s = results["settings"]
    parts = ["<h2>Reproducibility</h2>",
             f"<p>Command:</p><pre>{html.escape(results.get('command') or '')}</pre>",
             f"<p>Process argv:</p><pre>{html.escape(' '.join(results.get('argv') or []))}</pre>",
             f"<p>Feature extractor: <code>{html.escape(ex['name'])}</code> ({esc(ex['dim'])}-d) — "
             f"{html.escape(ex['description'])}; weights SHA-1: <code>{html.escape(str(ex.get('weights_sha1')))}"
             "</code>. Numbers from different extractors are not comparable.</p>",
             f"<p>Seeds: {html.escape(s['seed_rule'])}; the same seeds for every model and step count.</p>",
             "<p>Versions: " + ", ".join(f"{html.escape(k)} {html.escape(str(val))}" for k, val in v.items()) + "</p>"]
    rows = [[c.text(r["key"]), c.num("runs", i, "model_hash"), c.text(r["images_dir"]), c.num("runs", i, "timesteps")]
            for i, r in enumerate(results["runs"])]
    parts.append(table("Models and timesteps", ex["name"], ["run", "model hash (UNet sha256)", "images",
                                                           "timesteps"], rows))
    return "\n".join(parts)


def render_utility_only(results: dict) -> str:
    """The page of `llcm evaluate --utility` without --model: the utility, the command, versions, the JSON."""
    c = Cells(results)
    s = results["settings"]
    v = results["versions"]
    return "\n".join([
        f"<!doctype html><html><head><meta charset='utf-8'><title>llcm evaluation</title><style>{CSS}</style>"
        "</head><body>", "<h1>llcm evaluation report</h1>",
        f"<p>Real dataset <code>{html.escape(s['data'])}</code>; no model evaluated (only --utility). Created "
        f"{html.escape(results['created'])}.</p>",
        utility_section(results, c),
        "<h2>Reproducibility</h2>",
        f"<p>Command:</p><pre>{html.escape(results.get('command') or '')}</pre>",
        f"<p>Process argv:</p><pre>{html.escape(' '.join(results.get('argv') or []))}</pre>",
        "<p>Versions: " + ", ".join(f"{html.escape(k)} {html.escape(str(val))}" for k, val in v.items()) + "</p>",
        "<h2>All results (JSON)</h2><details><summary>results.json</summary>"
        f"<pre id='results-json'>{html.escape(json.dumps(results, indent=1))}</pre></details>",
        "</body></html>"])


def render_html(results: dict, out: Path) -> str:
    if "runs" not in results:
        return render_utility_only(results)
    c = Cells(results)
    ex = results["extractor"]["name"]
    s = results["settings"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>llcm evaluation</title>"
             f"<style>{CSS}</style></head><body>",
             "<h1>llcm evaluation report</h1>",
             f"<p>{len(results['runs'])} runs, {len(results['classes'])} classes, {esc(s['per_class'])} images "
             "per class "
             f"and run; real images: the <code>{html.escape(s['test_split'])}</code> split of "
             f"<code>{html.escape(s['data'])}</code>; feature extractor <b><code>{html.escape(ex)}</code></b>. "
             f"Created {html.escape(results['created'])}.</p>"]
    mem = results.get("memorization")
    if mem and mem.get("copies_found"):
        parts.append(f'<p class="warn">Memorization check: {esc(mem["n_flagged"])} generated images look like '
                     "training copies (see below).</p>")
    parts += [table3(results, c), runs_table(results, c),
              f"<h2>Metrics against steps</h2>{_img(metric_plot(results), 'metrics vs steps')}",
              "<h2>Per-class scores</h2>", per_class_table(results, c, "fid", "Per-class FID")]
    rad = frd_shown(results)
    if rad:  # right after the per-class FID, on the same rows and columns
        note = ("FRD (llcm radiomics features; see the note under All runs), log scale, lower is better. Spearman "
                f"rank agreement with the per-class FID: {c.span('frd', 'rank_agreement_with_fid', 'cells')} over "
                f"{c.span('frd', 'rank_agreement_with_fid', 'n_cells')} (run, class) cells.")
        parts.append(per_class_table(results, c, "frd", "Per-class FRD (llcm radiomics features)", extractor=rad,
                                     note=note))
    parts += [per_class_table(results, c, "kid_mean", "Per-class KID"),
              per_class_table(results, c, "recall", "Per-class recall"),
              classifier_section(results, c), utility_section(results, c),
              "<h2>Image grids (classes × steps)</h2>"]
    for title, png in class_step_grids(results, out):
        parts.append(f"<h3>{html.escape(title)}</h3>{_img(png, title)}")
    kg = k_grids(results, out)
    if kg:
        parts.append("<h2>Ablation: consistency sampling grid k × steps</h2>")
        parts += [f"<h3>{html.escape(t)}</h3>{_img(png, t)}" for t, png in kg]
    parts += [memorization_section(results, c, out), reproducibility(results, c),
              "<h2>All results (JSON)</h2><details><summary>results.json</summary>"
              f"<pre id='results-json'>{html.escape(json.dumps(results, indent=1))}</pre></details>",
              "</body></html>"]
    return "\n".join(parts)


def write_report(results: dict, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write out/report.html (self-contained) and out/results.json (the same numbers)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    json_path.write_text(json.dumps(results, indent=2))
    page = render_html(results, out)
    html_path = out / "report.html"
    tmp = out / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, html_path)
    return html_path, json_path


__all__ = ["write_report", "render_html", "pointer", "resolve", "fmt", "metric_plot"]
