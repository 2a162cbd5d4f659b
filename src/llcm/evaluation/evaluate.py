"""The evaluation harness behind `llcm evaluate`: Table 3 of the paper and what reviewers now expect.

    plan_runs    model specs x steps (x sampling grids k) -> runs, one per table row
    generate     every (run, class, i) image as a PNG carrying its prompt, seed and steps; split across
                 processes by index (accelerate), files that exist are skipped (= resume)
    measure      FID / KID / precision-recall (k-NN manifolds), overall and per class, against the real
                 test split (features cached); FRD (llcm radiomics features, llcm.evaluation.radiomics) beside
                 FID, overall and per class (features cached too); memorization of every generated image vs the
                 train split;
                 classifier accuracy: a small CNN trained on the train split (llcm.evaluation.classifier,
                 cached) labels the real test images and every run's images
    utility      with --utility SYNTH_DIR: train on synthetic, test on real (llcm.evaluation.utility); alone when
                 no model is given
    evaluate     all of it, then the JSON + HTML report (llcm.evaluation.report)

A model is given as ``NAME=FOLDER[:SAMPLER][@N[,N...]]`` (see `parse_model_spec`):

    llcm=runs/llcm/model                  consistency sampling at each --steps (the folder has a w-embedding;
                                          "default" or an adapter folder work too, see llcm.adapter)
    teacher=runs/teacher/model:ddim@50    the teacher with real CFG, DDIM at 50 steps ("Stable Diffusion")
    teacher=runs/teacher/model:dpmpp@20   the same teacher with DPM-Solver++ (2S) at 20 steps
    db=runs/dreambooth:ddim@50            a DreamBooth set (dreambooth.json: one fine-tuned teacher per class)
    sd=/data/sd-images:images             images made elsewhere: FOLDER/<steps>/<class>/*.png (nothing generated)

Layout of EVAL_DIR: images/<model>/<sampler>-<steps>[-k<k>]/<class>/<seed>.png (+ run.json, timing-<rank>.jsonl),
features/ (cached generated-image features: <run>.<extractor>.npz, <run>.radiomics.npz for FRD), cache/ (real
test/train features, radiomics too, and thumbnails; the classifier check's classifier-<key>.safetensors + .json),
results.json, report.html. Seeds: image i of class c uses seed0 + c * 1_000_000 + i, the same for every model and
step count, so rows are paired and any single image can be regenerated alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from llcm.errors import UserError
from llcm.fileio import record_name
from llcm.model_folder import read_config, read_meta, read_schedule
from llcm.evaluation.classifier import DEFAULT_EPOCHS as CLASSIFIER_EPOCHS

SEED_STRIDE = 1_000_000
DEFAULT_TEACHER_W = 6.5  # LCM form; Stable Diffusion's default guidance scale 7.5 = 1 + w
RESULTS_FORMAT = "llcm-eval-v1"
THUMB = 32  # memorization SSIM size (llcm.evaluation.memorization's default)
PR_K = 3  # k of the k-NN balls of precision / recall / density / coverage (llcm.evaluation.metrics)
_SPEC = re.compile(r"^(?P<sampler>[a-z][a-z0-9+_-]*)?(?:@(?P<steps>\d+(?:,\d+)*))?$")


# ----------------------------------------------------------------------------------------------
# What to evaluate


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    sampler: str | None = None  # None: consistency (the folder must have a w-embedding)
    steps: tuple[int, ...] | None = None  # None: the global --steps


def parse_model_spec(text: str) -> ModelSpec:
    """``NAME=FOLDER[:SAMPLER][@N[,N...]]``; SAMPLER is consistency, images or a solver (ddim, dpmpp, ...)."""
    name, eq, rest = text.partition("=")
    if not eq or not name or not rest:
        raise UserError(f"--model {text!r}: expected NAME=FOLDER[:SAMPLER][@N,...], e.g. teacher=runs/t/model:ddim@50")
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise UserError(f"--model {text!r}: the name may only use letters, digits and . _ + -")
    sampler, steps, path = None, None, rest
    head, colon, tail = rest.rpartition(":")
    m = _SPEC.fullmatch(tail) if colon and head else None
    if m and (m.group("sampler") or m.group("steps")):
        path, sampler = head, m.group("sampler")
        steps = tuple(int(s) for s in m.group("steps").split(",")) if m.group("steps") else None
    else:  # FOLDER@N without a sampler
        m2 = re.fullmatch(r"(?P<path>.+?)@(?P<steps>\d+(?:,\d+)*)", rest)
        if m2:
            path, steps = m2.group("path"), tuple(int(s) for s in m2.group("steps").split(","))
    if sampler == "consistency":
        sampler = None
    if steps is not None and any(s < 1 for s in steps):
        raise UserError(f"--model {text!r}: step counts must be >= 1")
    return ModelSpec(name, path, sampler, steps)


@dataclass
class EvalConfig:
    data: str
    models: list[ModelSpec]
    out: str
    steps: tuple[int, ...] = (1, 2, 4, 8)
    per_class: int = 100
    extractor: str = "inception"
    extractor_weights: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    seed: int = 0
    w: float | None = None  # None: each consistency model's own default w; teachers use teacher_w
    teacher_w: float = DEFAULT_TEACHER_W
    ks: tuple[int | None, ...] = (None,)  # consistency sampling grids; None = the model's own k
    batch_size: int = 32
    classes: tuple[str, ...] | None = None
    memorization: bool = True
    classifier: bool = True  # the classifier-accuracy check (measured from the images on disk)
    classifier_epochs: int = CLASSIFIER_EPOCHS
    cos_threshold: float | None = None
    ssim_threshold: float | None = None
    grid_seeds: int = 1
    frd: bool = True  # FRD (llcm radiomics features) beside FID, overall and per class
    utility: str | None = None  # a synthetic dataset: train on synthetic, test on real (llcm.evaluation.utility)
    utility_seeds: int = 3  # seeds cfg.seed, cfg.seed + 1, ... of the utility's classifiers
    command: str = ""
    progress: bool = True

    def validate(self) -> None:
        if not self.models and not self.utility:
            raise UserError("give at least one --model NAME=FOLDER[:SAMPLER][@N] (or --utility SYNTH_DIR alone)")
        if self.utility and self.utility_seeds < 1:
            raise UserError(f"--utility-seeds must be >= 1, got {self.utility_seeds}")
        if self.per_class < 1:
            raise UserError(f"--per-class must be >= 1, got {self.per_class}")
        if self.classifier_epochs < 1:
            raise UserError(f"--classifier-epochs must be >= 1, got {self.classifier_epochs}")
        if not 1 <= self.batch_size <= 64:
            raise UserError(f"--batch must be between 1 and 64, got {self.batch_size}")
        if any(s < 1 for s in self.steps):
            raise UserError("--steps must be positive integers")
        for flag, w in (("--w", self.w), ("--teacher-w", self.teacher_w)):
            if w is not None and not 0 <= w < float("inf"):  # NaN fails too
                raise UserError(f"{flag} must be a finite number >= 0 (LCM form), got {w}")
        names = Counter((m.name, m.sampler) for m in self.models)
        if any(v > 1 for v in names.values()):
            dup = [k for k, v in names.items() if v > 1][0]
            raise UserError(f"model {dup[0]!r} with sampler {dup[1] or 'consistency'!r} is given twice; "
                            "list its step counts in one entry (NAME=FOLDER:SAMPLER@N,M)")


@dataclass(frozen=True)
class ClassInfo:
    index: int  # position in the sorted class list of the test split (fixes the seeds)
    name: str
    prompt: str  # the most common text of the class in the test split
    n_test: int


@dataclass
class Run:
    """One table row: a model sampled one way at one step count (and consistency grid k)."""

    model: str
    path: str
    kind: str  # consistency | teacher | dreambooth | images
    sampler: str  # consistency | images | a solver name
    steps: int
    k: int | None = None  # consistency only: sampling grid; None = the model's own

    @property
    def key(self) -> str:
        return f"{self.model}/{self.sampler}-{self.steps}" + (f"-k{self.k}" if self.k else "")

    @property
    def label(self) -> str:
        return self.model if self.kind == "consistency" else f"{self.model} ({self.sampler})"


def class_table(data: str, split: str, only: Sequence[str] | None = None) -> tuple[list[ClassInfo], list[dict]]:
    """Classes of a split (sorted by name) with their prompt; the rows of the selected classes."""
    from llcm.data import read_split

    rows = read_split(data, split)
    if not rows:
        raise UserError(f"{data} has no {split!r} split (no {split}/metadata.jsonl)")
    texts: dict[str, Counter] = {}
    for r in rows:
        texts.setdefault(class_of(r), Counter())[r.get("text", "")] += 1
    names = sorted(texts)
    if only:
        missing = [c for c in only if c not in texts]
        if missing:
            raise UserError(f"class(es) {', '.join(missing)} not in {split}; it has: {', '.join(names)}")
    keep = set(only or names)
    classes = [ClassInfo(i, n, texts[n].most_common(1)[0][0], sum(texts[n].values()))
               for i, n in enumerate(names) if n in keep]
    rows = [r for r in rows if class_of(r) in keep]
    return classes, rows


def class_of(row: dict) -> str:
    """A dataset row's class: its `class` field, else its prompt."""
    return str(row.get("class") or row.get("text"))


def _unet_config(folder: Path) -> dict:
    from llcm.adapter import full_model_folder

    f = full_model_folder(folder) / "unet" / "config.json"  # an adapter keeps its base's architecture
    return json.loads(f.read_text()) if f.is_file() else {}


def model_kind(spec: ModelSpec) -> str:
    from llcm.pipeline import resolve_model

    folder = resolve_model(spec.path)
    if not folder.exists():
        raise UserError(f"--model {spec.name}: {spec.path} does not exist (llcm never downloads models)")
    if spec.sampler == "images":
        return "images"
    if (folder / "dreambooth.json").is_file():
        if spec.sampler is None:
            raise UserError(f"--model {spec.name}: a DreamBooth set is a teacher; name a solver, e.g. "
                            f"{spec.name}={spec.path}:ddim@50")
        return "dreambooth"
    guided = _unet_config(folder).get("time_cond_proj_dim") is not None
    if spec.sampler is None:
        if not guided:
            raise UserError(f"--model {spec.name}: {spec.path} is a teacher (no w-embedding); name a solver, "
                            f"e.g. {spec.name}={spec.path}:ddim@50 or :dpmpp@20")
        return "consistency"
    from llcm.solvers import SOLVERS

    if spec.sampler not in SOLVERS:
        raise UserError(f"--model {spec.name}: unknown sampler {spec.sampler!r}; use consistency, images or a "
                        f"solver ({', '.join(SOLVERS)})")
    if guided:
        raise UserError(f"--model {spec.name}: {spec.path} is a consistency model; drop ':{spec.sampler}' "
                        "(it is sampled with multistep consistency sampling)")
    return "teacher"


def image_steps(folder: Path) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def plan_runs(cfg: EvalConfig) -> list[Run]:
    from llcm.pipeline import resolve_model

    runs: list[Run] = []
    for spec in cfg.models:
        kind = model_kind(spec)
        path = str(resolve_model(spec.path).resolve())
        if kind == "images":
            steps = spec.steps or tuple(image_steps(Path(path)))
            if not steps:
                raise UserError(f"--model {spec.name}: {path} has no <steps>/<class>/ image folders")
        else:
            steps = spec.steps or cfg.steps
        sampler = {"consistency": "consistency", "images": "images"}.get(kind, spec.sampler)
        ks = cfg.ks if kind == "consistency" else (None,)
        runs += [Run(spec.name, path, kind, sampler, int(s), k) for k in ks for s in steps]
    keys = Counter(r.key for r in runs)
    if any(v > 1 for v in keys.values()):
        raise UserError(f"run {[k for k, v in keys.items() if v > 1][0]} appears twice")
    return runs


# ----------------------------------------------------------------------------------------------
# Samplers: one per model kind, all with generate(cls, prompts, seeds, steps, timesteps, w) -> float [B, H, W, 3]


def _stored_hash(folder: Path) -> str:
    h = read_meta(folder).get("unet_hash")
    if h:
        return str(h)
    from llcm.models import model_hash

    return model_hash(folder)


class ConsistencySampler:
    per_class = False

    def __init__(self, folder: str, device: torch.device):
        from llcm.pipeline import LLCMPipeline

        self.pipe = LLCMPipeline.from_pretrained(folder)
        self.pipe.to(device)

    def prompt(self, cls: ClassInfo) -> str:
        return cls.prompt

    def generate(self, cls: ClassInfo | None, prompts, seeds, steps, timesteps, w) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a w outside the trained range is recorded, not repeated per batch
            return self.pipe(list(prompts), steps, list(seeds), w, timesteps=timesteps).images


class TeacherSampler:
    per_class = False

    def __init__(self, folder: str, solver: str, device: torch.device):
        from llcm.models import load_components

        self.folder, self.solver = Path(folder), solver
        self.components = load_components(folder).to(device)
        self.schedule = read_schedule(self.folder)
        self.latent_mean = read_config(self.folder).latent_mean  # where its samples start (initial_latents)

    def prompt(self, cls: ClassInfo) -> str:
        return cls.prompt

    def generate(self, cls, prompts, seeds, steps, timesteps, w) -> np.ndarray:
        from llcm.dreambooth import sample_teacher_latents
        from llcm.pipeline import decode_latents

        z = sample_teacher_latents(self.components, self.schedule, prompts, seeds, self.solver, steps, w,
                                   batch=len(prompts), latent_mean=self.latent_mean)
        return decode_latents(self.components, z.to(self.components.vae.device))


class DreamBoothSampler:
    """One fine-tuned teacher per class (dreambooth.json); each class is sampled with its instance prompt."""

    per_class = True

    def __init__(self, folder: str, solver: str, device: torch.device):
        from llcm.dreambooth import read_set

        self.index, self.solver, self.device = read_set(folder)["classes"], solver, device
        self._loaded: tuple[str, TeacherSampler] | None = None

    def entry(self, cls: ClassInfo) -> dict:
        e = self.index.get(cls.name) or next((v for v in self.index.values() if v.get("class_prompt") == cls.prompt),
                                             None)
        if e is None:
            raise UserError(f"the DreamBooth set has no model for class {cls.name!r}; train it with "
                            f"`llcm train dreambooth --class {cls.name}`")
        return e

    def prompt(self, cls: ClassInfo) -> str:
        return self.entry(cls)["prompt"]

    def generate(self, cls, prompts, seeds, steps, timesteps, w) -> np.ndarray:
        model = self.entry(cls)["model"]
        if self._loaded is None or self._loaded[0] != model:
            self._loaded = (model, TeacherSampler(model, self.solver, self.device))
        self._loaded[1].solver = self.solver
        return self._loaded[1].generate(cls, prompts, seeds, steps, timesteps, w)


def open_sampler(run: Run, device: torch.device):
    if run.kind == "consistency":
        return ConsistencySampler(run.path, device)
    if run.kind == "dreambooth":
        return DreamBoothSampler(run.path, run.sampler, device)
    return TeacherSampler(run.path, run.sampler, device)


def nfe(run: Run, w: float) -> int | None:
    """UNet evaluations per image: consistency = steps; ODE = ((steps - 1) * calls/step + 1) x 2 with CFG."""
    if run.kind == "consistency":
        return run.steps
    if run.kind == "images":
        return None
    from llcm.solvers import CALLS_PER_STEP

    return ((run.steps - 1) * CALLS_PER_STEP[run.sampler] + 1) * (2 if w > 0 else 1)


def run_identity(run: Run, cfg: EvalConfig) -> dict:
    """What a run's images depend on: a run folder made with anything else is refused, never mixed."""
    if run.kind == "images":
        return {"model": run.model, "path": record_name(run.path), "kind": run.kind, "steps": run.steps}
    folder = Path(run.path)
    if run.kind == "dreambooth":
        from llcm.dreambooth import read_set

        entries = read_set(folder)["classes"]
        hashes = {c: _stored_hash(Path(e["model"])) for c, e in sorted(entries.items())}
        model_hash = _short_digest(json.dumps(hashes, sort_keys=True))
        extra = {"class_hashes": hashes, "prompts": {c: e["prompt"] for c, e in entries.items()}}
    else:
        model_hash, extra, entries = _stored_hash(folder), {}, {}
    n_train = read_schedule(Path(entries[next(iter(entries))]["model"]) if run.kind == "dreambooth" and entries
                           else folder).num_train_timesteps
    if run.kind == "consistency":
        meta = read_meta(folder)
        w = meta.get("w_default", 7.0) if cfg.w is None else cfg.w
        k = run.k or meta.get("k", 20)
        from llcm.sampling import consistency_timesteps

        try:
            ts = consistency_timesteps(run.steps, n_train, k)
        except ValueError as exc:
            raise UserError(f"{run.key}: {exc}") from None
        extra.update({"distilled_with": {"solver": meta.get("solver"), "k": meta.get("k"),
                                         "w_range": [meta.get("w_min"), meta.get("w_max")]}, "k": k})
    else:
        from llcm.sampling import teacher_timesteps

        w, ts = (cfg.teacher_w if cfg.w is None else cfg.w), teacher_timesteps(run.steps, n_train)
    return {"model": run.model, "path": record_name(run.path), "kind": run.kind, "sampler": run.sampler,
            "steps": run.steps, "w": float(w), "timesteps": ts, "model_hash": model_hash, "seed0": cfg.seed,
            "seed_rule": f"seed = {cfg.seed} + class_index * {SEED_STRIDE} + i", "nfe": nfe(run, float(w)), **extra}


def _short_digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# Generation (split across processes, resumable)


def run_dir(out: Path, run: Run) -> Path:
    return Path(run.path) if run.kind == "images" else out / "images" / run.key


def seed_of(cfg: EvalConfig, cls: ClassInfo, i: int) -> int:
    return cfg.seed + cls.index * SEED_STRIDE + i


def image_path(out: Path, run: Run, cls: ClassInfo, seed: int) -> Path:
    return run_dir(out, run) / _safe(cls.name) / f"{seed}.png"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "_"


def run_images(out: Path, run: Run, classes: list[ClassInfo], cfg: EvalConfig) -> list[tuple[ClassInfo, Path]]:
    """The images of a run, class by class, in seed order (the rows of its feature matrix)."""
    if run.kind == "images":
        from llcm.evaluation.features import IMAGE_SUFFIXES

        base = run_dir(out, run) / str(run.steps)
        found = []
        for c in classes:
            folder = base / c.name if (base / c.name).is_dir() else base / _safe(c.name)
            files = sorted((p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES),
                           key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0, p.name))
            found += [(c, p) for p in files[:cfg.per_class]]
        return found
    return [(c, image_path(out, run, c, seed_of(cfg, c, i))) for c in classes for i in range(cfg.per_class)]


def write_png(path: Path, image: np.ndarray, meta: dict) -> None:
    """Atomically write a uint8 PNG whose text chunks carry `meta` (llcm:prompt, llcm:seed, llcm:steps, ...)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in meta.items():
        info.add_text(f"llcm:{k}", v if isinstance(v, str) else json.dumps(v))
    info.add_text("parameters", json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)


def prepare_run_dirs(out: Path, runs: list[Run], cfg: EvalConfig, write: bool) -> dict[str, dict]:
    """run.json of every run: written when missing, checked when present (a mismatch is an error)."""
    idents = {}
    for run in runs:
        ident = run_identity(run, cfg)
        idents[run.key] = ident
        if run.kind == "images":
            continue
        f = run_dir(out, run) / "run.json"
        if f.is_file():
            old = json.loads(f.read_text())
            diff = [k for k in ident if k not in ("path", "seed_rule") and old.get(k) != ident[k]]
            if diff:
                raise UserError(f"{f.parent} holds images made with different {', '.join(diff)} "
                                f"({', '.join(f'{k}: {old.get(k)!r} != {ident[k]!r}' for k in diff[:2])}); "
                                "use another --out or delete that folder")
        elif write:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_name(f".run.json.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(ident, indent=2))
            os.replace(tmp, f)
    return idents


def generate(cfg: EvalConfig, runs: list[Run], classes: list[ClassInfo], process_index: int = 0,
             num_processes: int = 1, device: torch.device | str = "cpu") -> dict:
    """Write the missing images of this process's share (item j of the global list goes to process
    j % num_processes). Returns {"generated": n, "skipped": n, "seconds": s}."""
    from tqdm.auto import tqdm

    out, device = Path(cfg.out), torch.device(device)
    idents = prepare_run_dirs(out, runs, cfg, write=True)
    items = [(r, c, i) for r in runs if r.kind != "images" for c in classes for i in range(cfg.per_class)]
    mine = items[process_index::num_processes]
    todo = [(r, c, i) for r, c, i in mine if not image_path(out, r, c, seed_of(cfg, c, i)).exists()]
    stats = {"generated": 0, "skipped": len(mine) - len(todo), "seconds": 0.0}
    if not todo:
        return stats
    from llcm import __version__

    bar = tqdm(total=len(todo), desc=f"generate [{process_index}]", disable=not cfg.progress, dynamic_ncols=True)
    by_run: dict[str, list] = {}
    for r, c, i in todo:
        by_run.setdefault(r.key, []).append((r, c, i))
    sampler_cache: tuple[tuple[str, str], object] | None = None
    for key, work in by_run.items():
        run = work[0][0]
        ident = idents[key]
        if sampler_cache is None or sampler_cache[0] != run.path:  # one load per model folder
            sampler_cache = None  # free the previous model first
            sampler_cache = (run.path, open_sampler(run, device))
        sampler = sampler_cache[1]
        sampler.solver = run.sampler  # teachers: the same weights, another solver
        groups: dict = {}
        for r, c, i in work:
            groups.setdefault(c.name if sampler.per_class else "", []).append((c, i))
        timing = run_dir(out, run) / f"timing-{process_index}.jsonl"
        for group in groups.values():
            for j in range(0, len(group), cfg.batch_size):
                batch = group[j:j + cfg.batch_size]
                prompts = [sampler.prompt(c) for c, _ in batch]
                seeds = [seed_of(cfg, c, i) for c, i in batch]
                t0 = time.perf_counter()
                with torch.no_grad():
                    images = to_uint8(sampler.generate(batch[0][0], prompts, seeds, run.steps, ident["timesteps"],
                                                       ident["w"]))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                for (c, i), img, prompt, seed in zip(batch, images, prompts, seeds):
                    write_png(image_path(out, run, c, seed), img,
                              {"prompt": prompt, "seed": seed, "steps": run.steps, "w": ident["w"],
                               "timesteps": ident["timesteps"], "sampler": run.sampler, "class": c.name,
                               "model": run.model, "model_hash": ident["model_hash"],
                               "software": f"llcm {__version__}"})
                with open(timing, "a") as fh:
                    fh.write(json.dumps({"n": len(batch), "seconds": dt, "process": process_index,
                                         "device": str(device)}) + "\n")
                stats["generated"] += len(batch)
                stats["seconds"] += dt
                bar.update(len(batch))
    bar.close()
    return stats


def run_timing(out: Path, run: Run) -> dict:
    n, s, devices = 0, 0.0, set()
    for f in sorted(run_dir(out, run).glob("timing-*.jsonl")) if run.kind != "images" else []:
        for line in f.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                n, s = n + rec["n"], s + rec["seconds"]
                devices.add(rec.get("device", "?"))
    return {"timed_images": n, "seconds": s, "seconds_per_image": (s / n) if n else None, "devices": sorted(devices)}


# ----------------------------------------------------------------------------------------------
# Measuring


def thumbnails(paths: Sequence[str | os.PathLike], cache: Path | None = None, batch: int = 256) -> np.ndarray:
    """uint8 [N, 32, 32] luminance thumbnails (memorization's SSIM input), read batch by batch, cached."""
    from llcm.evaluation.features import load_images
    from llcm.evaluation.memorization import to_gray_small
    from llcm.evaluation.metrics import fingerprint

    key = fingerprint(paths)
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return z["thumbs"]
    out = [to_uint8(to_gray_small(load_images(paths[i:i + batch]), THUMB)) for i in range(0, len(paths), batch)]
    thumbs = np.concatenate(out) if out else np.zeros((0, THUMB, THUMB), np.uint8)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npz")
        np.savez(tmp, thumbs=thumbs, key=np.array(key))
        os.replace(tmp, cache)
    return thumbs


def split_features(ex, out: Path, name: str, paths: list[str], progress: bool):
    from llcm.evaluation.features import extract_features
    from llcm.evaluation.metrics import cached_stats, fingerprint

    return cached_stats(out / "cache" / f"{name}.{ex.name}.npz", ex.name, fingerprint(paths),
                        lambda: extract_features(ex, paths, progress=progress))


def metrics_or_none(real: np.ndarray, fake: np.ndarray, extractor: str, k: int = PR_K, seed: int = 0) -> dict:
    """compute_all, or as much of it as the sample sizes allow (FID needs 2 rows, precision/recall k + 1)."""
    from llcm.evaluation.metrics import compute_all, fid

    n = min(len(real), len(fake))
    if n > k:
        return compute_all(real, fake, extractor=extractor, k=k, seed=seed)
    row = {"extractor": extractor, "n_real": len(real), "n_fake": len(fake), "fid": None, "kid_mean": None,
           "kid_std": None, "precision": None, "recall": None, "density": None, "coverage": None, "k": k}
    if n >= 2:
        row["fid"] = fid(real, fake)
    return row


FRD_DESCRIPTION = (
    "FRD (llcm radiomics features): the Fréchet Radiomics Distance recipe (Konz et al., FRD v1) on llcm's 169 "
    "radiomic features (first-order + GLCM statistics of the standardized luminance, its LoG sigma 1, 2, 3 and a "
    "fine band, + raw mean and std; scikit-image), z-scored with the real set's mean and std, log of the "
    "Fréchet distance; lower is better. Not frd-score's pyradiomics features: values are not comparable with "
    "frd-score or published FRDs (llcm.evaluation.radiomics)")


def frd_extractor(cfg: EvalConfig) -> tuple[object | None, str | None]:
    """The radiomics extractor, or (None, why FRD is not computed): --no-frd, or scikit-image missing (one note)."""
    if not cfg.frd:
        return None, "--no-frd"
    from llcm.evaluation.radiomics import RadiomicsExtractor

    try:
        return RadiomicsExtractor(), None
    except UserError as exc:  # its one dependency beyond numpy/scipy (scikit-image) is missing
        print(f"note: FRD skipped: {exc}", file=sys.stderr)
        return None, str(exc)


def frd_or_none(real: np.ndarray, fake: np.ndarray) -> float | None:
    """FRD (llcm radiomics features) of two feature sets; None with fewer than 2 rows on a side, when every
    feature is constant in the real set, or when the distance is not finite (identical sets: -inf)."""
    from llcm.evaluation.radiomics import frd

    if len(real) < 2 or len(fake) < 2:
        return None
    try:
        v = frd(real, fake)
    except ValueError:
        return None
    return v if np.isfinite(v) else None


def rank_agreement(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
    """Spearman's rho over the pairs where both values are known; None with fewer than 3 or when undefined."""
    from scipy.stats import spearmanr

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if len(pairs) < 3:
        return None
    x, y = zip(*pairs)
    if len(set(x)) < 2 or len(set(y)) < 2:  # a constant side: rho undefined
        return None
    rho = spearmanr(x, y)[0]
    return float(rho) if np.isfinite(rho) else None


def frd_summary(runs_out: list[dict], rad, skipped: str | None, seconds: float, n_images: int) -> dict:
    """results["frd"]: what FRD is here, and how it ranks the runs and (run, class) cells next to FID;
    seconds_this_session: radiomics features of n_images images (extracted, or read from the caches) + the FRDs."""
    if rad is None:
        return {"description": FRD_DESCRIPTION, "skipped": skipped, "extractor": None, "features": None,
                "rank_agreement_with_fid": None}
    fid_runs = [r["metrics"]["fid"] for r in runs_out]
    frd_runs = [r["metrics"]["frd"] for r in runs_out]
    cells = [(pc["fid"], pc["frd"]) for r in runs_out for pc in r["per_class"].values()]
    n_runs = sum(a is not None and b is not None for a, b in zip(fid_runs, frd_runs))
    n_cells = sum(a is not None and b is not None for a, b in cells)
    return {"description": FRD_DESCRIPTION, "skipped": None, "extractor": rad.name, "features": rad.dim,
            "rank_agreement_with_fid": {"runs": rank_agreement(fid_runs, frd_runs), "n_runs": n_runs,
                                        "cells": rank_agreement(*zip(*cells)) if cells else None, "n_cells": n_cells,
                                        "method": "Spearman rho of FID vs FRD; None with fewer than 3 values"},
            "seconds_this_session": seconds, "n_images": n_images}


def measure(cfg: EvalConfig, runs: list[Run], classes: list[ClassInfo], test_rows: list[dict],
            train_rows: list[dict], device="cpu") -> dict:
    """Features, metrics, memorization -> the results dict (everything the report shows)."""
    from llcm.evaluation.features import extract_features, get_extractor
    from llcm.evaluation.metrics import cached_stats, compute_all, fingerprint

    out = Path(cfg.out)
    ex = get_extractor(cfg.extractor, cfg.extractor_weights, device=device)
    test_paths = [r["path"] for r in test_rows]
    test_labels = np.array([class_of(r) for r in test_rows])
    real = split_features(ex, out, f"real-{_safe(cfg.test_split)}", test_paths, cfg.progress)
    rad, frd_skipped = frd_extractor(cfg)
    t_frd = time.perf_counter()
    real_rad = split_features(rad, out, f"real-{_safe(cfg.test_split)}", test_paths, cfg.progress) if rad else None
    frd_seconds = time.perf_counter() - t_frd
    idents = prepare_run_dirs(out, runs, cfg, write=False)

    results_runs, all_gen_paths, all_gen_feats, all_thumbs, gen_owner, gen_labels = [], [], [], [], [], []
    for ri, run in enumerate(runs):
        pairs = run_images(out, run, classes, cfg)
        missing = [str(p) for _, p in pairs if not p.exists()]
        if missing:
            raise UserError(f"{len(missing)} images of {run.key} are missing (e.g. {missing[0]}); run the command "
                            "again to generate them")
        if not pairs:
            raise UserError(f"{run.key}: no images found for the selected classes")
        paths = [str(p) for _, p in pairs]
        labels = np.array([c.name for c, _ in pairs])
        fake = cached_stats(out / "features" / f"{_safe(run.key)}.{ex.name}.npz", ex.name, fingerprint(paths),
                            lambda: extract_features(ex, paths, progress=cfg.progress))
        # with fewer images than feature dimensions, FID from the feature rows is exact (low-rank route)
        low_rank = min(real.n, fake.n) <= ex.dim
        overall = compute_all(real.features if low_rank else real, fake.features if low_rank else fake,
                              extractor=ex.name, k=PR_K, seed=cfg.seed)
        per_class = {c.name: metrics_or_none(real.features[test_labels == c.name], fake.features[labels == c.name],
                                             ex.name, seed=cfg.seed) for c in classes}
        if rad is not None:  # FRD beside FID: the same images, llcm's radiomics features (cached like the others)
            t_frd = time.perf_counter()
            fake_rad = cached_stats(out / "features" / f"{_safe(run.key)}.{rad.name}.npz", rad.name,
                                    fingerprint(paths), lambda: extract_features(rad, paths, progress=cfg.progress))
            overall["frd"] = frd_or_none(real_rad.features, fake_rad.features)
            for c in classes:
                per_class[c.name]["frd"] = frd_or_none(real_rad.features[test_labels == c.name],
                                                       fake_rad.features[labels == c.name])
            frd_seconds += time.perf_counter() - t_frd
        ident = idents[run.key]
        results_runs.append({
            "key": run.key, "label": run.label, "model": run.model, "kind": run.kind, "sampler": run.sampler,
            "steps": run.steps, "k": ident.get("k"), "w": ident.get("w"), "nfe": ident.get("nfe"),
            "timesteps": ident.get("timesteps"), "model_hash": ident.get("model_hash"),
            "distilled_with": ident.get("distilled_with"), "n_images": len(paths),
            "images_dir": os.path.relpath(run_dir(out, run), out), "timing": run_timing(out, run),
            "seconds_per_image": run_timing(out, run)["seconds_per_image"],
            "metrics": overall, "per_class": per_class,
            "grid": _grid_files(pairs, cfg.grid_seeds, out),
        })
        all_gen_paths += paths
        gen_labels += labels.tolist()
        all_gen_feats.append(fake.features)
        if cfg.memorization:
            all_thumbs.append(thumbnails(paths, out / "features" / f"{_safe(run.key)}.thumbs{THUMB}.npz"))
        gen_owner += [ri] * len(paths)

    results = {"runs": results_runs}
    if cfg.frd:
        results["frd"] = frd_summary(results_runs, rad, frd_skipped, frd_seconds,
                                     len(test_paths) + len(all_gen_paths))
    if cfg.memorization:
        train_paths = [r["path"] for r in train_rows]
        if len(train_paths) < 2:
            raise UserError(f"the {cfg.train_split!r} split has fewer than 2 images; pass --no-memorization")
        train = split_features(ex, out, f"real-{_safe(cfg.train_split)}", train_paths, cfg.progress)
        results["memorization"] = memorization(cfg, out, ex.name, all_gen_paths, np.concatenate(all_thumbs),
                                               np.concatenate(all_gen_feats), np.array(gen_owner), train_paths, train,
                                               results_runs)
    if cfg.classifier:
        results["classifier"] = classifier_check(cfg, out, test_paths, test_labels.tolist(), train_rows,
                                                 all_gen_paths, gen_labels, np.array(gen_owner), results_runs,
                                                 classes, device)
    results["extractor"] = {"name": ex.name, "dim": ex.dim, "description": ex.description,
                            "weights_sha1": getattr(ex, "sha1", None),
                            "weights_file": record_name(getattr(ex, "weights_path", None) or "") or None}
    results["real"] = {"split": cfg.test_split, "n": int(real.n), "cache_key": real.key,
                       "per_class_n": {c.name: int((test_labels == c.name).sum()) for c in classes}}
    return results


def classifier_check(cfg: EvalConfig, out: Path, test_paths: list[str], test_labels: list[str],
                     train_rows: list[dict], gen_paths: list[str], gen_labels: list[str], owner: np.ndarray,
                     runs_out: list[dict], classes: list[ClassInfo], device="cpu") -> dict:
    """Train (or load from OUT/cache) a small CNN on every train image, then the share of real test images and
    of each run's images it assigns to their class. Accuracies are fractions in [0, 1]; the gap is in points
    (100 x fraction) against the class-balanced real accuracy, since every run has the same images per class."""
    from llcm.evaluation.classifier import cached_classifier

    train_paths = [r["path"] for r in train_rows]
    train_labels = [class_of(r) for r in train_rows]
    if len(set(train_labels)) < 2:
        raise UserError(f"the {cfg.train_split!r} split has fewer than 2 classes; the classifier check needs "
                        "2 or more: pass --no-classifier")
    clf, cached = cached_classifier(out / "cache", train_paths, train_labels, seed=cfg.seed,
                                    epochs=cfg.classifier_epochs, device=device, progress=cfg.progress)
    t0 = time.perf_counter()
    real_hit = np.array(clf.predict(test_paths)) == np.array(test_labels)
    gen_hit = np.array(clf.predict(gen_paths)) == np.array(gen_labels)
    predict_seconds = time.perf_counter() - t0
    test_labels_a, gen_labels_a = np.array(test_labels), np.array(gen_labels)

    def share(hit: np.ndarray) -> float | None:
        return float(hit.mean()) if hit.size else None

    per_class_real = {c.name: share(real_hit[test_labels_a == c.name]) for c in classes}
    known = [v for v in per_class_real.values() if v is not None]
    balanced = float(np.mean(known)) if known else None
    for ri, r in enumerate(runs_out):
        m = owner == ri
        acc = share(gen_hit[m])
        r["classifier_accuracy"] = acc
        r["classifier_accuracy_gap_points"] = None if acc is None or balanced is None else 100.0 * (balanced - acc)
        r["classifier_per_class_accuracy"] = {c.name: share(gen_hit[m & (gen_labels_a == c.name)]) for c in classes}
    s = clf.settings
    return {
        "real_test_accuracy": share(real_hit), "real_test_balanced_accuracy": balanced,
        "per_class_real_accuracy": per_class_real, "n_test": len(test_paths), "n_train": int(clf.info["n_train"]),
        "per_class_n_train": clf.info.get("per_class_n_train"), "train_split": cfg.train_split,
        "classes": clf.classes, "missing_from_train": [c.name for c in classes if c.name not in clf.classes],
        "epochs": s.epochs, "steps": clf.info.get("steps"), "final_loss": clf.info.get("final_loss"),
        "seconds": clf.info.get("seconds"), "torch_threads": clf.info.get("torch_threads"),
        "trained_on": clf.info.get("device"), "cached": cached, "predict_seconds": predict_seconds,
        "settings": dataclasses.asdict(s), "cache_file": f"cache/classifier-{clf.info.get('key')}.safetensors",
        "gap_reference": "real_test_balanced_accuracy",
        "description": (f"a small CNN (3x3 conv stem + {s.depth} stride-2 3x3 conv/GroupNorm/ReLU blocks, "
                        f"{s.width}-{s.width * 2 ** (s.depth - 1)} channels, average + max pooling, linear) "
                        f"trained from scratch on all {clf.info['n_train']} {cfg.train_split!r} images "
                        f"({len(clf.classes)} classes, resized to {s.size}x{s.size} RGB) for {s.epochs} epochs "
                        f"with AdamW (lr {s.lr:g}, cosine decay, weight decay {s.weight_decay:g}, batch "
                        f"{s.batch_size}, seed {s.seed}); accuracy = share of images it assigns to the class they "
                        "belong to (real) or were generated for (runs); gap = balanced real test accuracy - run "
                        "accuracy, in points"),
    }


def _grid_files(pairs, n_seeds: int, out: Path) -> dict[str, list[str]]:
    """The first n_seeds images of each class (relative to out when inside it), for the report's grids."""
    grid: dict[str, list[str]] = {}
    for c, p in pairs:
        lst = grid.setdefault(c.name, [])
        if len(lst) < n_seeds:
            lst.append(os.path.relpath(p, out))
    return grid


def memorization(cfg: EvalConfig, out: Path, extractor: str, gen_paths: list[str], gen_thumbs: np.ndarray,
                 gen_feats: np.ndarray, owner: np.ndarray, train_paths: list[str], train, runs_out: list[dict]) -> dict:
    """find_copies over every generated image at once (one baseline, one pair of thresholds), split by run."""
    from llcm.evaluation.memorization import MemorizationWarning, find_copies

    train_thumbs = thumbnails(train_paths, out / "cache" / f"thumbs-{_safe(cfg.train_split)}-{THUMB}.npz")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = find_copies(gen_thumbs, train_thumbs, gen_feats, train.features, extractor,
                          cos_threshold=cfg.cos_threshold, ssim_threshold=cfg.ssim_threshold, ssim_size=THUMB,
                          seed=cfg.seed)
    for w in caught:  # recorded for the report, and still raised for Python callers
        if issubclass(w.category, MemorizationWarning):
            warnings.warn(w.message, stacklevel=2)
    summary = rep.summary(n_top=8)
    flagged = rep.flagged
    for ri, r in enumerate(runs_out):
        m = owner == ri
        r["memorization"] = {"n": int(m.sum()), "n_flagged": int(flagged[m].sum()),
                             "share_flagged": float(flagged[m].mean()), "max_ssim": float(rep.ssim[m].max()),
                             "max_cosine": float(rep.feature_cosine[m].max())}
    for key in ("top_by_ssim", "top_by_cosine"):
        for p in summary[key]:
            p["gen_path"] = os.path.relpath(gen_paths[p["gen"]], out)
            p["train_path"] = os.path.relpath(train_paths[p["train"]], out)  # a link for the report, not a path
            p["run"] = runs_out[int(owner[p["gen"]])]["key"]
    summary["train_split"] = cfg.train_split
    summary["n_train"] = len(train_paths)
    summary["warnings"] = [str(w.message) for w in caught]
    nearest = np.where(rep.ssim >= rep.ssim_threshold, rep.ssim_index, rep.feature_index)
    summary["flagged_images"] = [{"gen_path": os.path.relpath(gen_paths[g], out),
                                  "train_path": os.path.relpath(train_paths[int(nearest[g])], out),
                                  "ssim": float(rep.ssim[g]), "cosine": float(rep.feature_cosine[g])}
                                 for g in np.flatnonzero(flagged)[:200]]
    return summary


# ----------------------------------------------------------------------------------------------
# Everything


def versions() -> dict:
    import importlib.metadata as md

    from llcm import __version__

    v = {"llcm": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "diffusers", "transformers", "accelerate", "numpy", "scipy", "matplotlib"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    v["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return v


def evaluate(cfg: EvalConfig, process_index: int | None = None, num_processes: int | None = None,
             report: bool = True) -> dict | None:
    """Plan, generate (this process's share), then on the main process measure and write the report.

    Under `accelerate launch` every process generates its share; only process 0 returns the results.
    """
    cfg.validate()
    state = None
    if process_index is None:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        process_index, num_processes, device = state.process_index, state.num_processes, state.device
    else:
        num_processes = num_processes or 1
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(cfg.out)
    utility_plan = None
    if cfg.utility:  # its inputs are checked before anything is generated
        from llcm.evaluation.utility import plan_utility

        utility_plan = plan_utility(cfg.data, cfg.utility, train_split=cfg.train_split, test_split=cfg.test_split)
    if not cfg.models:
        return evaluate_utility_only(cfg, utility_plan, process_index, device, report)
    out.mkdir(parents=True, exist_ok=True)
    classes, test_rows = class_table(cfg.data, cfg.test_split, cfg.classes)
    n_gen = cfg.per_class * len(classes)
    if min(len(test_rows), n_gen) <= PR_K:  # before any image is generated
        raise UserError(f"precision/recall need more than k={PR_K} images on each side (k-NN balls): the "
                        f"{cfg.test_split!r} split has {len(test_rows)} images of the selected classes and each run "
                        f"{n_gen} (--per-class {cfg.per_class} x {len(classes)} classes); use more test images, "
                        "classes or --per-class")
    runs = plan_runs(cfg)
    t0 = time.perf_counter()
    gen = generate(cfg, runs, classes, process_index, num_processes, device)
    if state is not None:
        state.wait_for_everyone()
    if process_index != 0:
        return None
    gen_seconds = time.perf_counter() - t0
    from llcm.data import read_split

    # every class: a copy is a copy, and the classifier learns every train class
    train_rows = read_split(cfg.data, cfg.train_split) if cfg.memorization or cfg.classifier else []
    t1 = time.perf_counter()
    results = measure(cfg, runs, classes, test_rows, train_rows, device)
    if utility_plan is not None:
        results["utility"] = _run_utility(cfg, utility_plan, device)
    results = {
        "format": RESULTS_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": cfg.command, "argv": [record_name(a) for a in sys.argv], "versions": versions(),
        "settings": {"data": record_name(cfg.data), "test_split": cfg.test_split,
                     "train_split": cfg.train_split, "per_class": cfg.per_class, "steps": list(cfg.steps),
                     "ks": [k for k in cfg.ks], "seed": cfg.seed,
                     "seed_rule": f"seed = {cfg.seed} + class_index * {SEED_STRIDE} + i", "w": cfg.w,
                     "teacher_w": cfg.teacher_w, "batch_size": cfg.batch_size, "processes": num_processes,
                     "memorization": cfg.memorization, "classifier": cfg.classifier, "frd": cfg.frd,
                     "classifier_epochs": cfg.classifier_epochs if cfg.classifier else None,
                     "nfe_rule": "UNet evaluations per image (CFG counts 2)", **_utility_settings(cfg)},
        "classes": [dataclasses.asdict(c) for c in classes],
        "models": [{**dataclasses.asdict(m), "path": record_name(m.path)} for m in cfg.models],
        **results,
        "timing": {"generation_seconds_this_session": gen_seconds, "generated_this_session": gen["generated"],
                   "skipped_existing": gen["skipped"], "measure_seconds": time.perf_counter() - t1},
    }
    return _write_results(results, out, report)


def _write_results(results: dict, out: Path, report: bool) -> dict:
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    if report:
        from llcm.evaluation.report import write_report

        t2 = time.perf_counter()
        results = json.loads((out / "results.json").read_text())  # exactly what the JSON file holds
        write_report(results, out)
        print(f"report: {out / 'report.html'} ({time.perf_counter() - t2:.1f} s)", file=sys.stderr)
    return results


def _utility_settings(cfg: EvalConfig) -> dict:
    return {"utility": record_name(cfg.utility) if cfg.utility else None,
            "utility_seeds": cfg.utility_seeds if cfg.utility else None}


def _run_utility(cfg: EvalConfig, plan, device) -> dict:
    """Train on synthetic / real / both, test on real: seeds cfg.seed, cfg.seed + 1, ...; the classifier check's
    epochs."""
    from llcm.evaluation.utility import run_utility

    return run_utility(plan, seeds=range(cfg.seed, cfg.seed + cfg.utility_seeds), epochs=cfg.classifier_epochs,
                       device=device, progress=cfg.progress)


def evaluate_utility_only(cfg: EvalConfig, plan, process_index: int, device, report: bool = True) -> dict | None:
    """`llcm evaluate --utility SYNTH_DIR` without --model: only the utility, into results.json and report.html."""
    if process_index != 0:
        return None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {
        "format": RESULTS_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": cfg.command, "argv": [record_name(a) for a in sys.argv], "versions": versions(),
        "settings": {"data": record_name(cfg.data), "test_split": cfg.test_split, "train_split": cfg.train_split,
                     "seed": cfg.seed, "classifier_epochs": cfg.classifier_epochs, **_utility_settings(cfg)},
        "utility": _run_utility(cfg, plan, device),
    }
    results["timing"] = {"measure_seconds": time.perf_counter() - t0}
    return _write_results(results, out, report)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serializable: {type(o)}")


__all__ = ["ModelSpec", "EvalConfig", "ClassInfo", "Run", "parse_model_spec", "plan_runs", "class_table",
           "generate", "measure", "evaluate", "classifier_check", "class_of", "nfe", "run_images", "image_path",
           "seed_of", "thumbnails", "SEED_STRIDE", "DEFAULT_TEACHER_W"]
