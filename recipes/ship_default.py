"""Ship a recipe run's better student as llcm's default model, with its model card.

    python recipes/ship_default.py runs/mini [--dest src/llcm/default_model]

Reads the run's evaluation (runs/mini/eval/results.json), picks the student with the lower FID at 4
steps (`lcm` = paper leapfrog = DDIM, `llcm-midpoint` = second-order), copies its model folder to
--dest, renders the reference image (fixed prompt, seeds, steps) that the tests compare against, and
writes README.md (the model card) and card.json (hashes, numbers, reference) beside the weights.
Every number in the card is read from the run's files; nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

STUDENTS = {"lcm": "leapfrog", "llcm-midpoint": "midpoint"}
REFERENCE = {"prompt": "axial brain MRI, T1-weighted", "seeds": [0, 1, 2, 3], "steps": 4}
CARD_FILES = ("README.md", "card.json")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() not in CARD_FILES}


def files_table(hashes: dict[str, str]) -> str:
    """The card's "Files (SHA-256)" table."""
    return "| file | sha256 |\n|---|---|\n" + "\n".join(f"| {f} | `{h}` |" for f, h in hashes.items()) + "\n"


def amend_card(tmp: Path, dest: Path, card: dict, section: str, body: str, **entries) -> dict[str, str]:
    """Finish amending a shipped model copied to `tmp`: card.json gets the new file hashes and `entries`, the
    card README's "## {section}" (placed before "## Reference image") becomes `body`, its file table is redone,
    and `tmp` replaces `dest`. Returns the file hashes."""
    hashes = file_hashes(tmp)
    card.update(files=hashes, bytes=sum((tmp / f).stat().st_size for f in hashes), **entries)
    (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    readme = (tmp / "README.md").read_text()
    readme = re.sub(rf"^## {re.escape(section)}\n.*?(?=^## )", "", readme, flags=re.S | re.M)
    readme = readme.replace("## Reference image", body.rstrip("\n") + "\n\n## Reference image")
    readme = readme[:readme.index("| file | sha256 |")] + files_table(hashes)
    (tmp / "README.md").write_text(readme)
    shutil.rmtree(dest)
    tmp.rename(dest)
    return hashes


def runs_by_key(results: dict) -> dict[str, dict]:
    return {r["key"]: r for r in results["runs"]}


def fmt(v, nd=2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def stage_times(run: Path) -> list[tuple[str, int]]:
    """[(stage, seconds taken)] from the recipe's timing.txt ('[recipe] X done at Ns')."""
    out, last = [], 0
    f = run / "timing.txt"
    for line in f.read_text().splitlines() if f.exists() else []:
        name, _, at = line.split("] ", 1)[-1].rpartition(" done at ")
        sec = int(at.rstrip("s"))
        out.append((name, sec - last))
        last = sec
    return out


def quality_table(results: dict) -> tuple[str, dict]:
    runs = runs_by_key(results)
    teacher = runs.get("teacher/ddim-50")
    t_fid = teacher["metrics"]["fid"] if teacher else None
    real_acc = (results.get("classifier") or {}).get("real_test_accuracy")
    lines = ["| model | sampler | steps | NFE | FID | FID / teacher | KID x1e3 | precision | recall | classifier accuracy | gap (points) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    summary = {"teacher_ddim50_fid": t_fid, "real_test_classifier_accuracy": real_acc, "students": {}}
    for r in results["runs"]:
        m = r["metrics"]
        ratio = m["fid"] / t_fid if t_fid else None
        acc = r.get("classifier_accuracy")
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r.get('nfe') or r['steps']} | {fmt(m['fid'])} | "
                     f"{fmt(ratio)} | {fmt(m['kid_mean'] * 1e3)} | {fmt(m['precision'])} | {fmt(m['recall'])} | "
                     f"{fmt(acc * 100 if acc is not None else None, 1)}{'%' if acc is not None else ''} | "
                     f"{fmt(r.get('classifier_accuracy_gap_points'), 1)} |")
        if r["model"] in STUDENTS:
            summary["students"].setdefault(r["model"], {})[str(r["steps"])] = {
                "fid": m["fid"], "fid_over_teacher": ratio, "classifier_accuracy": acc,
                "classifier_gap_points": r.get("classifier_accuracy_gap_points")}
    return "\n".join(lines), summary


def pick_student(summary: dict) -> str:
    four = {name: s["4"]["fid"] for name, s in summary["students"].items() if "4" in s}
    if not four:
        raise SystemExit("the evaluation has no 4-step student runs (models lcm / llcm-midpoint)")
    return min(four, key=four.get)


def render_reference(dest: Path) -> dict:
    from llcm.images import make_grid
    from llcm.pipeline import LLCMPipeline

    pipe = LLCMPipeline.from_pretrained(dest)
    ref = REFERENCE
    gen = pipe([ref["prompt"]] * len(ref["seeds"]), steps=ref["steps"], seeds=ref["seeds"])
    grid = make_grid(gen.pil_images(), cols=len(ref["seeds"]))
    grid.save(dest / "reference.png")
    return {**ref, "w": gen.w, "timesteps": gen.timesteps, "file": "reference.png", "model_hash": gen.model_hash}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="recipe run folder (bash recipes/mini.sh RUN)")
    ap.add_argument("--dest", type=Path, default=Path(__file__).resolve().parents[1] / "src/llcm/default_model")
    ap.add_argument("--student", choices=sorted(STUDENTS), default=None, help="override the choice by FID")
    ap.add_argument("--run-note", default="", help="a sentence about the run for the card (interruptions, load)")
    ap.add_argument("--recipe", default="bash recipes/mini.sh runs/mini",
                    help="the recipe command that made RUN, for the card (e.g. 'PROFILE=gpu bash recipes/mini.sh runs/mini')")
    args = ap.parse_args(argv)
    run, dest = args.run, args.dest
    results = json.loads((run / "eval" / "results.json").read_text())
    table, summary = quality_table(results)
    student = args.student or pick_student(summary)
    src = run / f"llcm-{STUDENTS[student]}" / "model"
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    for p in tmp.rglob("*"):  # the package ships weights and configs only
        if p.is_file() and p.suffix not in (".safetensors", ".json", ".txt"):
            p.unlink()
    reference = render_reference(tmp)
    hashes = file_hashes(tmp)
    size = sum((tmp / f).stat().st_size for f in hashes)
    data_card = (run / "data" / "card.md").read_text().split("## Sources")[0]
    data_classes = (data_card[data_card.index("## Classes"):].strip().replace("## Classes", "### Classes")
                    if "## Classes" in data_card else "")
    llcm_cfg = json.loads((tmp / "llcm.json").read_text())
    trained = {}  # steps actually trained (a time limit can end a run before its max_steps) and batch
    for name, folder in (("vae", "vae"), ("teacher", "teacher"), *((n, f"llcm-{v}") for n, v in STUDENTS.items())):
        f = run / folder / "summary.json"
        cfg = json.loads((run / folder / "config.json").read_text()) if (run / folder / "config.json").exists() else {}
        if f.exists():
            trained[name] = {"steps": json.loads(f.read_text())["step"], "batch": cfg.get("train", {}).get("batch_size")}
    times = stage_times(run)
    s4 = summary["students"]
    mem = results.get("memorization") or {}
    card = {"student": student, "solver": STUDENTS[student], "model_hash": reference["model_hash"], "files": hashes,
            "bytes": size, "reference": reference, "quality": summary, "extractor": results.get("extractor"),
            "per_class_images": results.get("settings", {}).get("per_class"), "llcm": llcm_cfg,
            "recipe_stage_seconds": dict(times), "recipe": args.recipe, "trained": trained,
            "run_note": args.run_note, "memorization": {k: mem.get(k) for k in
                                                                  ("n_gen", "n_train", "n_flagged", "share_flagged")}}
    (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    other = [n for n in s4 if n != student]
    why = (f"{student} has the lower FID at 4 steps ({fmt(s4[student]['4']['fid'])} vs "
           f"{fmt(s4[other[0]]['4']['fid'])} for {other[0]})" if other else f"{student} is the only student")
    acc = summary["real_test_classifier_accuracy"]
    clf = results.get("classifier") or {}
    clf_sentence = (f"it scores {acc * 100:.1f}% on the real test split (class-balanced "
                    f"{clf.get('real_test_balanced_accuracy', acc) * 100:.1f}%; the gap column is that minus the "
                    "run's accuracy, in points)." if acc is not None
                    else "not measured in this evaluation.")
    mem_sentence = (f"Memorization (nearest training image of every generated image): {mem['n_flagged']} of "
                    f"{mem['n_gen']} generated images flagged as possible copies of the {mem['n_train']} training "
                    "images." if mem else "Memorization: not run in this evaluation (`llcm evaluate` runs it "
                    "unless --no-memorization).")
    mu = llcm_cfg.get("latent_mean")
    start_line = ("" if not mu else
                  f"- Sampling starts from eps - mean_hw(eps) + sqrt(alpha_bar_999) * mu (the draw's own per-channel "
                  "spatial mean removed: `python bench/failure_seeds.py`), mu = `latent_mean` in llcm.json = "
                  f"({', '.join(f'{v:.3f}' for v in mu)}), the channel mean of the train latents (README: \"Where "
                  "sampling starts\"); diffusers' own pipeline needs `latents=` for the same images.\n")
    readme = f"""# llcm default model

A Leapfrog Latent Consistency Model small enough to ship inside the package ({size / 2**20:.1f} MiB,
safetensors): it turns a text prompt into a 64x64 medical-looking image in 1 to 8 steps on a CPU,
offline. It was trained from scratch by llcm's own pipeline on the embedded `llcm data mini`
dataset; it is a demonstration and test fixture, **not** a model for clinical or diagnostic use, and
its images are synthetic phantoms of 10 classes, nothing more.

- Student shipped: **{student}** (distilled with the `{STUDENTS[student]}` solver). Chosen because {why}.
- Model hash (llcm): `{reference['model_hash']}`; k = {llcm_cfg.get('k')}, trained w range
  [{llcm_cfg.get('w_min')}, {llcm_cfg.get('w_max')}], default w = {llcm_cfg.get('w_default')} (LCM form; guidance scale = 1 + w).
{start_line}- Text encoder: a 2-layer CLIP text transformer (64-d) with CLIP's real BPE tokenizer (vocabulary bundled
  with llcm); its weights are random (seed 2) and frozen: it acts as a fixed code for each prompt, so the
  10 training prompts below work best; other prompts still produce images, of no defined class.

## Data

{data_classes}

Full data card: `llcm data mini --out DIR` writes it (`DIR/card.md`); MNI152 template notice and the
sources' licences are listed there.

## Recipe

```
{args.recipe}          # data, VAE, teacher, both students, evaluation
python recipes/ship_default.py runs/mini  # this folder
```

Stage times of the run that produced these weights, as its timing.txt recorded them (seconds; see the
README for the machine and the load it shared): {", ".join(f"{n} {s}" for n, s in times) or "(not recorded)"}.
{args.run_note}

Steps trained x batch (from the run's summary.json and config.json files): {"; ".join(
        f"{n} {t['steps']} x {t['batch']}" for n, t in trained.items()) or "(not recorded)"}.

## Quality

`llcm evaluate` on the test split ({results['real']['n']} real images), {results.get('settings', {}).get('per_class')}
generated images per class and run, extractor `{(results.get('extractor') or {}).get('name')}`
(with small samples FID is biased upwards; compare rows, not papers). Classifier accuracy: a small CNN
trained on the train split; {clf_sentence}

{table}

{mem_sentence}

## Reference image

`reference.png`: prompt "{reference['prompt']}", seeds {reference['seeds']}, {reference['steps']} steps,
w = {reference['w']}; `pytest tests/test_default_model.py` regenerates it and compares.

## Files (SHA-256)

""" + files_table(hashes)
    (tmp / "README.md").write_text(readme)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    print(f"shipped {student} ({size / 2**20:.1f} MiB) to {dest}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
