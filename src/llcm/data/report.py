"""What a build writes besides the images: metadata rows, stats.json and the dataset card.

All three are pure functions of the assembled build, sorted, without time stamps or absolute
paths, so that a rebuild produces the same bytes.
"""

from __future__ import annotations

from collections import Counter

from llcm.data.taxonomy import FIELDS

PRIVACY = (
    "Output images are re-encoded pixels only: no EXIF, no DICOM header. From DICOM headers only the "
    "whitelisted Modality and Body Part Examined defined terms are kept (`dicom_modality`, "
    "`dicom_body_part`). Output file names are content hashes, so no source file or folder name "
    "(which may hold patient names or IDs) is copied except through the class labels; a class label "
    "that contains a token of any DICOM patient name, ID or date in the sources is refused "
    "(`label_contains_phi`). DICOM files flagged with burned-in annotation are refused. Pixel data "
    "itself (faces in head scans, text burned into ultrasound or screenshots without the flag) is "
    "not inspected: review the sources' own de-identification statements."
)


def metadata_rows(plan, split: str, asm, specs, held: list[str]) -> list[dict]:
    """Rows of `<split>/metadata.jsonl` (HF imagefolder: `file_name` relative to the split folder)."""
    rows = []
    held_set = set(held)
    for s, fname, e in plan:
        if s != split:
            continue
        info = asm.infos[e.class_id]
        spec = specs[e.item.source]
        meta = e.frame.get("meta") or {}
        row = {"file_name": fname, "text": info.prompt, "class": info.id}
        row.update({f: getattr(info, f) for f in FIELDS})
        row.update({
            "source": spec.name,
            "licence": spec.licence,
            "content_hash": e.hash,
            "width": e.frame["w"],
            "height": e.frame["h"],
            "frame": e.frame["i"],
            "source_split": e.item.split,
            "held_out": info.id in held_set,
            "dicom_modality": meta.get("modality", ""),
            "dicom_body_part": meta.get("body_part", ""),
        })
        rows.append(row)
    return rows


def make_stats(fingerprint, opts, specs, scans, asm, splits, held, dirs) -> dict:
    classes = {}
    for cid in sorted(asm.infos):
        info = asm.infos[cid]
        parts = splits.get(cid, {"train": [], "test": []})
        classes[cid] = {
            "folder": dirs[cid],
            "keys": sorted(asm.keys_of.get(cid, [])),
            "prompt": info.prompt,
            **info.fields(),
            "mapped": info.mapped,
            "unmapped_reason": info.unmapped_reason,
            "held_out": cid in held,
            "train": len(parts["train"]),
            "test": len(parts["test"]),
            "sources": sorted({specs[e.item.source].name for sp in ("train", "test") for e in parts[sp]}),
            "rejections": dict(sorted(asm.by_class.get(cid, Counter()).items())),
        }
    per_source = []
    kept_by_source = Counter()
    split_by_source = {"train": Counter(), "test": Counter()}
    for parts in splits.values():
        for sp in ("train", "test"):
            for e in parts[sp]:
                kept_by_source[e.item.source] += 1
                split_by_source[sp][e.item.source] += 1
    for i, (spec, scan) in enumerate(zip(specs, scans)):
        rej = asm.by_source.get(i, Counter())
        per_source.append({
            "name": spec.name,
            "licence": spec.licence,
            "archive": spec.is_archive,
            "files": len(scan.items),
            "label_files": scan.label_files,
            "label_rows_without_file": scan.label_rows_missing,
            "ignored_files": dict(sorted(scan.ignored.items())),
            "kept": kept_by_source[i],
            "train": split_by_source["train"][i],
            "test": split_by_source["test"][i],
            "rejected": sum(rej.values()),
            "rejections": dict(sorted(rej.items())),
        })
    train = sum(c["train"] for c in classes.values())
    test = sum(c["test"] for c in classes.values())
    return {
        "builder_version": 2,
        "title": opts.title,
        "fingerprint": fingerprint,
        "options": opts.output_fields(),
        "totals": {
            "classes": sum(1 for c in classes.values() if c["train"] + c["test"] > 0),
            "train": train,
            "test": test,
            "images": train + test,
            "files": sum(len(s.items) for s in scans),
            "frames_decoded": asm.frames_decoded,
            "rejected": sum(asm.rejections.values()),
        },
        "rejections": dict(sorted(asm.rejections.items())),
        "duplicates": {k: asm.duplicates.get(k, 0) for k in ("exact", "near", "cross_source", "class_conflicts")},
        "unmapped": {cid: c["unmapped_reason"] for cid, c in classes.items() if not c["mapped"]},
        "held_out_classes": list(held),
        # DICOM Body Part Examined values that are not a defined term (free text, names, numbers): dropped
        "dicom_values_dropped": {"body_part": sum(
            1 for parts in splits.values() for sp in ("train", "test") for e in parts[sp]
            if (e.frame.get("meta") or {}).get("body_part_dropped"))},
        "sources": per_source,
        "classes": classes,
    }


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def class_table(stats: dict) -> str:
    """The per-class table of the card (like the paper's per-class train/test tables)."""
    lines = ["| class | modality | body part | finding | train | test | prompt |",
             "|---|---|---|---|---:|---:|---|"]
    for cid, c in stats["classes"].items():
        if c["train"] + c["test"] == 0:
            continue
        finding = ", ".join(v for v in (c["disease"], c["condition"]) if v) or "-"
        name = f"{cid} (held out)" if c["held_out"] else cid
        lines.append(f"| {_cell(name)} | {_cell(c['modality'] or '-')} | {_cell(c['body_part'] or '-')} | "
                     f"{_cell(finding)} | {c['train']} | {c['test']} | {_cell(c['prompt'])} |")
    t = stats["totals"]
    lines.append(f"| **total ({t['classes']} classes)** | | | | **{t['train']}** | **{t['test']}** | |")
    return "\n".join(lines)


def render_card(stats: dict, reasons: dict) -> str:
    o, t = stats["options"], stats["totals"]
    size = f"{o['size']}×{o['size']}" if o["crop"] else f"shorter side {o['size']}"
    fmt = f"JPEG quality {o['quality']}" if o["image_format"] == "jpg" else "PNG"
    cap = f"at most {o['cap']} train images per class, the excess in test" if o["cap"] else "no cap"
    frac = o.get("test_fraction", 0)
    held = (f"at least {frac * 100:g}% of each class in test (one image of a class of two or more)" if frac
            else "no test fraction (the paper's rule)")
    out = [f"# {stats['title']}", ""]
    out.append(f"{t['classes']} classes, **{t['train']} train** and **{t['test']} test** images "
               f"({size}, {fmt}, {'RGB' if o['color'] == 'rgb' else 'original channels'}), built by "
               f"`llcm data build` from {len(stats['sources'])} source(s): {t['files']} files, "
               f"{t['frames_decoded']} decoded images, {t['rejected']} left out (reasons below).")
    out += ["", f"Split: {held}; {cap}; drawn with seed {o['seed']}."]
    if stats["held_out_classes"]:
        out.append(f"Held-out classes (all images in test): {', '.join(stats['held_out_classes'])}.")
    out += ["", "Layout: Hugging Face `imagefolder`: `train/<class>/<hash>.ext` and `test/<class>/<hash>.ext`, "
            "each split with a `metadata.jsonl` (`file_name`, `text` prompt, `class`, "
            + ", ".join(f"`{f}`" for f in FIELDS)
            + ", `source`, `licence`, `content_hash`, ...). Machine-readable statistics: `stats.json`.", ""]
    out += ["## Classes", "", class_table(stats), ""]
    out += ["## Sources and licences", "", "| source | licence | files | kept | train | test | left out |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for s in stats["sources"]:
        out.append(f"| {_cell(s['name'])} | {_cell(s['licence'])} | {s['files']} | {s['kept']} | {s['train']} | "
                   f"{s['test']} | {s['rejected']} |")
    out += ["", "Each source keeps its own licence; the `licence` field of every row lets you select "
            "redistributable subsets.", ""]
    out += ["## Rejection report", "", "| reason | images | meaning |", "|---|---:|---|"]
    for reason, desc in reasons.items():
        n = stats["rejections"].get(reason, 0)
        if n:
            out.append(f"| `{reason}` | {n} | {desc} |")
    extra = sorted(set(stats["rejections"]) - set(reasons))
    for reason in extra:
        out.append(f"| `{reason}` | {stats['rejections'][reason]} | |")
    if not stats["rejections"]:
        out.append("| (none) | 0 | |")
    d = stats["duplicates"]
    out += ["", f"Duplicates: {d['exact']} exact and {d['near']} near (perceptual-hash distance ≤ "
            f"{o['near_duplicate_distance']} of 512 bits); {d['cross_source']} of them across sources, "
            f"{d['class_conflicts']} with a different class than the kept copy (first occurrence kept, "
            "sources in the order given).", ""]
    out += ["## Taxonomy", ""]
    if stats["unmapped"]:
        out.append("Classes not fully mapped (kept, fields not guessed; add them to a mapping file "
                   "and pass `--mapping`):")
        out.append("")
        for cid, why in stats["unmapped"].items():
            out.append(f"- `{cid}`: {why}")
    else:
        out.append("Every class is mapped to the taxonomy.")
    out += ["", "## Privacy", "", PRIVACY, ""]
    dropped = stats.get("dicom_values_dropped", {}).get("body_part", 0)
    if dropped:
        out += [f"`dicom_body_part` left empty for {dropped} image(s): their Body Part Examined was not a "
                "DICOM defined term (free text, a name or a number), so it was dropped.", ""]
    if o.get("notes"):
        out += [o["notes"].rstrip(), ""]
    out += ["## Build options", "", "```json"]
    import json

    out.append(json.dumps({k: v for k, v in o.items() if k != "notes"}, indent=2, sort_keys=True))
    out += ["```", "", f"Fingerprint of inputs and options: `{stats['fingerprint'][:16]}`.", ""]
    return "\n".join(out)
