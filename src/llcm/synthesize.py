"""`llcm synthesize`: a synthetic dataset another tool can read, in the layout `llcm data build` writes.

    OUT/train/<class>/<index>.png|.dcm|.nii.gz   one image per file (a --stack NIfTI: one volume per class)
    OUT/train/metadata.jsonl                      rows as `llcm data build` writes them (file_name, text, class,
                                                  taxonomy fields) plus seed, steps, w, model_hash, synthetic
    OUT/card.md, OUT/stats.json                   the model's card and the counts and settings
    OUT/.synthesize/                              the journal a rerun resumes from (removed nowhere: it is small)

Image i of class c is drawn with seed `seed + c * SEED_STRIDE + i`, c the class's position in the model's class
list (as `llcm evaluate` seeds its classes), in batches that start at fixed indices: a rerun, or a run resumed after a
kill, writes the same bytes, and one image is what `llcm generate --seed` gives for that seed and prompt (the
same sampler and decoder; only the batch differs, which moves a float by ~1e-5: at most one grey level, on
0.03% of the pixels of the default model's images).
With `filter_memorized` every image is checked against the model's training images (llcm.evaluation.memorization,
thresholds set once from the training set's own nearest-neighbour baseline); a flagged one is dropped and its
class draws on with the next seed of its stream, so the class still gets `per_class` images.

A class's colour mode follows its taxonomy: MRI, CT, X-ray, ultrasound ... are single-channel files, fundus
photographs and histopathology RGB; a modality the taxonomy does not know follows the model's measured
`grayscale` list (llcm.json).
"""

from __future__ import annotations

import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from llcm.data.build import atomic_write  # the builder's: temp sibling, then rename
from llcm.errors import UserError

FORMAT = "llcm-synthetic-v1"
FORMATS = ("png", "dicom", "nifti")
SUFFIX = {"png": ".png", "dicom": ".dcm", "nifti": ".nii.gz"}
SEED_STRIDE = 1_000_000  # = llcm.evaluation.evaluate.SEED_STRIDE: class c's images use seeds seed + c * stride + i
STATE = ".synthesize"
GRAYSCALE_MODALITIES = {"X-ray", "CT", "MRI", "ultrasound", "mammography", "PET", "OCT", "angiography",
                        "dental X-ray", "nuclear medicine"}
COLOUR_MODALITIES = {"fundus photograph", "dermoscopy", "clinical photograph", "histopathology", "microscopy",
                     "endoscopy"}
TAXONOMY_FIELDS = ("species", "body_part", "disease", "condition", "modality")
SETTINGS = ("model_hash", "classes", "per_class", "steps", "w", "seed", "format", "stack", "batch",
            "filter_memorized", "height", "width", "compiled", "dtype")
OLD_DEFAULTS = {"dtype": "fp32"}  # settings a run journaled before they existed had these values
DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class SynthClass:
    text: str  # the prompt
    id: str  # the class name (data build's `class`)
    folder: str
    position: int  # in the model's class list: the seed stream
    grayscale: bool
    fields: dict  # species, body_part, disease, condition, modality


def _slug(text: str) -> str:
    from llcm.data.taxonomy import slug

    return slug(text)[:60].strip("-") or "class"


def class_table(model_classes: Sequence[str], model_grayscale: Sequence[str], data: str | os.PathLike | None = None
                ) -> list[SynthClass]:
    """Every class the model knows, with its name and taxonomy: from the dataset it was trained on (`data`, its
    stats.json) when given, else from `llcm data mini`'s table (the default model's classes), else from the
    taxonomy's vocabulary matched against the prompt's words (the class named after the prompt)."""
    from llcm.data.mini import CLASSES as MINI
    from llcm.data.taxonomy import Taxonomy, words

    known: dict[str, tuple[str, str, dict]] = {}
    for c in MINI:
        known[c.prompt] = (c.name, c.name, {"species": "human", "body_part": c.body_part, "disease": c.disease,
                                             "condition": c.condition, "modality": c.modality})
    if data is not None:
        stats_path = Path(data) / "stats.json"
        try:
            stats = json.loads(stats_path.read_text(encoding="utf-8"))
            for cid, c in stats["classes"].items():
                known[c["prompt"]] = (cid, c.get("folder") or cid, {f: str(c.get(f) or "") for f in TAXONOMY_FIELDS})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{stats_path} is not an llcm dataset's stats.json ({exc})") from None
    taxonomy = Taxonomy()
    table, folders = [], set()
    for i, text in enumerate(model_classes):
        if text in known:
            cid, folder, fields = known[text]
        else:
            found, _ = taxonomy.match(words(text))
            fields = {f: " and ".join(found.get(f, [])) for f in TAXONOMY_FIELDS}
            fields["species"] = fields["species"] or taxonomy.default_species
            cid = folder = _slug(text)
        base, n = folder, 2
        while folder in folders:  # two prompts that slug alike
            folder, n = f"{base}-{n}", n + 1
        folders.add(folder)
        modality = fields.get("modality", "")
        grey = (modality in GRAYSCALE_MODALITIES if modality in GRAYSCALE_MODALITIES | COLOUR_MODALITIES
                else text in model_grayscale)
        table.append(SynthClass(text, cid, folder, i, grey, fields))
    return table


def select_classes(table: list[SynthClass], names: Sequence[str] | None) -> list[SynthClass]:
    """The classes asked for, by name, folder or prompt; an unknown one is refused with the list."""
    if not names:
        return table
    chosen = []
    for name in names:
        hit = [c for c in table if name in (c.id, c.folder, c.text)]
        if not hit:
            raise UserError(f"unknown class {name!r}; the model's classes are {', '.join(c.id for c in table)} "
                            "(a class's prompt works too)")
        if hit[0] not in chosen:
            chosen.append(hit[0])
    return chosen


# ----------------------------------------------------------------------------------------------- files


def to_uint8(image: np.ndarray, grayscale: bool) -> np.ndarray:
    """[H, W, 3] floats in [0, 1] -> uint8 [H, W] (grayscale: the luminance the pipeline put on every channel)
    or [H, W, 3]; the same rounding as `llcm generate`'s PNGs."""
    a = (image * 255).round().clip(0, 255).astype(np.uint8)
    return a[..., 0].copy() if grayscale else a


def png_bytes(pixels: np.ndarray, meta: dict) -> bytes:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", json.dumps(meta, sort_keys=True))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def file_bytes(fmt: str, pixels: np.ndarray, row: dict, cls: SynthClass, model_name: str) -> bytes:
    comment = (f"synthetic image generated by llcm {row['software']}; model {model_name} {row['model_hash']}; "
               f"prompt: {row['text']}; seed {row['seed']}; steps {row['steps']}; w {row['w']}")
    if fmt == "png":
        return png_bytes(pixels, {k: row[k] for k in ("text", "seed", "steps", "w", "model_hash", "software")})
    if fmt == "dicom":
        from llcm.medical_files import dicom_bytes

        key = f"{row['model_hash']}/{row['steps']}/{row['w']}"
        return dicom_bytes(pixels, modality=cls.fields.get("modality", ""), body_part=cls.fields.get("body_part", ""),
                           description=f"llcm synthetic: {cls.text}"[:64], comments=comment,
                           study_key=key, series_key=f"{key}/{cls.text}", instance_key=f"{key}/{row['seed']}",
                           instance_number=row["index"] + 1, series_number=cls.position + 1)
    from llcm.medical_files import nifti_bytes

    return nifti_bytes(pixels, description=f"llcm synthetic seed {row['seed']}")


# ----------------------------------------------------------------------------------------------- the run


def settings_of(model_hash: str, classes: list[SynthClass], per_class: int, steps: int, w: float, seed: int, fmt: str,
                stack: bool, batch: int, filter_memorized: bool, height: int, width: int, compiled: bool,
                dtype: str = "fp32") -> dict:
    return {"model_hash": model_hash, "classes": [c.text for c in classes], "per_class": per_class, "steps": steps,
            "w": w, "seed": seed, "format": fmt, "stack": stack, "batch": batch, "filter_memorized": filter_memorized,
            "height": height, "width": width, "compiled": compiled, "dtype": dtype}


def place(pipe, device, dtype: str):
    """The pipeline on `device` in `dtype` (fp32: as loaded; fp16/bf16: every network cast, as `llcm generate
    --dtype` does; the model hash stays the one of the weights as loaded)."""
    from llcm.training import HALF_DTYPES

    return pipe.to(device, HALF_DTYPES.get(dtype))


def use_compile(mode: str) -> bool:
    """torch.compile of the UNet and the decoder ('on') or not ('off', the default): on the default model, 2 CPU
    cores, batch 32, it measured no gain once warm (85.9 against 85.7 images/s, bench/synthesize.py) for 6-120 s
    of compiling; it is there for larger models and GPUs, where it may pay."""
    if mode not in ("on", "off"):
        raise UserError(f"--compile must be on or off, got {mode!r}")
    return mode == "on"


def check_out(out: Path, settings: dict) -> dict:
    """The journal of an earlier run of the same settings (resume), {} for an empty or new folder; anything else
    (another dataset, other settings) is refused before a file is written."""
    state_file = out / STATE / "state.json"
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
            previous = state["settings"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{state_file} is damaged; choose another --out") from None
        before = {k: previous.get(k, OLD_DEFAULTS.get(k)) for k in SETTINGS}
        diff = [f"{k} {before[k]!r} -> {settings[k]!r}" for k in SETTINGS if before[k] != settings[k]]
        if diff:
            raise UserError(f"{out} holds a synthetic dataset made with other settings ({'; '.join(diff[:3])}); "
                            "rerun with the same settings to resume it, or choose another --out")
        return state
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} is a file, not a folder")
        if any(out.iterdir()):
            what = "another dataset" if (out / "build.json").exists() or (out / "train").exists() else "other files"
            raise UserError(f"--out {out} already holds {what}; choose an empty or new folder (nothing was written)")
    return {}


def _journal(out: Path) -> list[dict]:
    """The batches finished so far: one JSON line each ({folder, start, rows}), written once its files are on
    disk; a torn last line (a kill while appending) is ignored."""
    entries = []
    path = out / STATE / "journal.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
    return entries


def _append(out: Path, entry: dict) -> None:
    with open(out / STATE / "journal.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


class MemorizationFilter:
    """find_copies against the training images with thresholds fixed once (from the training baseline)."""

    def __init__(self, data: str | os.PathLike, cache: Path, extractor: str = "inception"):
        from llcm.data.build import read_split
        from llcm.evaluation.evaluate import thumbnails
        from llcm.evaluation.features import extract_features, get_extractor
        from llcm.evaluation.memorization import find_copies

        rows = read_split(data, "train")
        if not rows:
            raise UserError(f"{data} has no train images to check the samples against")
        paths = [r["path"] for r in rows]
        self.extractor = get_extractor(extractor)
        self.train_thumbs = thumbnails(paths, cache / "train-thumbs.npz")
        feats_file = cache / f"train-{self.extractor.name}.npy"
        if feats_file.is_file():
            self.train_feats = np.load(feats_file)
        else:
            self.train_feats = extract_features(self.extractor, paths, progress=False)
            np.save(feats_file, self.train_feats)
        rep = find_copies(self.train_thumbs[:1], self.train_thumbs, self.train_feats[:1], self.train_feats,
                          self.extractor.name, warn=False)
        self.cos, self.ssim = rep.cos_threshold, rep.ssim_threshold

    def flagged(self, images: np.ndarray) -> np.ndarray:
        from llcm.evaluation.memorization import find_copies

        feats = self.extractor(images)
        rep = find_copies(images, self.train_thumbs, feats, self.train_feats, self.extractor.name,
                          cos_threshold=self.cos, ssim_threshold=self.ssim, baseline_samples=0, warn=False)
        return rep.flagged


class BatchMaker:
    """Samples one batch of a class and writes its files: in this process, or in each worker process."""

    def __init__(self, pipe, out: Path, settings: dict, base: dict, writers: ThreadPoolExecutor | None = None):
        self.pipe, self.out, self.s, self.base, self.writers = pipe, out, settings, base, writers

    def sample(self, cls: SynthClass, seeds: list[int]) -> list[np.ndarray]:
        s = self.s
        # a compiled model runs full batches only (another shape would compile again): a short last batch is
        # padded with the following seeds, whose images are dropped
        full = seeds + [seeds[-1] + 1 + j for j in range(s["batch"] - len(seeds))] if s["compiled"] else seeds
        result = self.pipe([cls.text] * len(full), steps=s["steps"], seeds=full, w=s["w"])
        return [to_uint8(img, cls.grayscale) for img in result.images[:len(seeds)]]

    def write(self, cls: SynthClass, index: int, seed: int, pixels: np.ndarray):
        """(the image's row, a future or None): the file is written in a writer thread when there is one."""
        fmt = self.s["format"]
        name = f"{cls.folder}/{index:06d}{SUFFIX[fmt]}"
        row = {"seed": seed, "index": index, "file_name": name, "text": cls.text, **self.base}
        if self.s["stack"]:  # slices wait in the journal folder until the class's volume is written
            path, data = self.out / STATE / f"{cls.folder}-{index:06d}.npy", None
        else:
            path, data = self.out / "train" / name, file_bytes(fmt, pixels, row, cls, self.base["model_name"])
        job = (lambda: np.save(path, pixels)) if data is None else (lambda: atomic_write(path, data))
        if self.writers is None:
            job()
            return row, None
        return row, self.writers.submit(job)

    def unit(self, cls: SynthClass, start: int, n: int) -> list[dict]:
        """Images start .. start + n - 1 of a class (no memorization filter: image i has seed offset i)."""
        seeds = [self.s["seed"] + cls.position * SEED_STRIDE + start + j for j in range(n)]
        made = [self.write(cls, start + j, sd, px) for j, (sd, px) in enumerate(zip(seeds, self.sample(cls, seeds)))]
        for _, job in made:
            if job is not None:
                job.result()
        return [row for row, _ in made]


_WORKER: BatchMaker | None = None


def _start_worker(model, adapter, device, threads: int, out: Path, settings: dict, base: dict) -> None:
    import torch

    from llcm.pipeline import load_pipeline

    global _WORKER
    torch.set_num_threads(threads)
    pipe = place(load_pipeline(model, adapter=adapter), device, settings["dtype"])
    if settings["compiled"]:
        pipe.components.unet.compile()
        pipe.components.vae.decoder.compile()
    _WORKER = BatchMaker(pipe, out, settings, base)


def _worker_unit(cls: SynthClass, start: int, n: int) -> tuple[str, int, list[dict]]:
    return cls.folder, start, _WORKER.unit(cls, start, n)


def default_workers(device: str, images: int, filter_memorized: bool) -> int:
    """On a CPU, one single-threaded process per core for runs of 1,000 images or more (a small UNet keeps two
    cores busier as two processes than as one with two threads: 1.16x on the default model); one process on a
    GPU, for a short run, or with the memorization filter (its redraws are sequential)."""
    if str(device).startswith("cuda") or images < 1000 or filter_memorized:
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


def synthesize(model, out: str | os.PathLike, per_class: int, classes: Sequence[str] | None = None,
               steps: int = 4, w: float | None = None, seed: int = 0, fmt: str = "png", stack: bool = False,
               batch: int = 32, filter_memorized: bool = False, data: str | os.PathLike | None = None,
               adapter: str | None = None, device: str = "cpu", progress: bool = True, compile: str = "off",
               workers: int | None = None, dtype: str = "fp32") -> dict:
    """Write (or finish) a synthetic dataset; returns its stats.json plus `this_run` (images, seconds, the steady
    rate after the first batch). `model`: a model folder, "default", or an LLCMPipeline already loaded (then one
    process). `workers`: processes (None: `default_workers`). See the module docstring."""
    from tqdm.auto import tqdm

    from llcm import __version__
    from llcm.pipeline import LLCMPipeline, load_pipeline
    from llcm.presets import MAX_SEED

    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if stack and fmt != "nifti":
        raise UserError("--stack writes one NIfTI volume per class: use it with --format nifti")
    if not 1 <= per_class <= SEED_STRIDE // 2:
        raise UserError(f"--per-class must be between 1 and {SEED_STRIDE // 2}, got {per_class}")
    if not 1 <= batch <= 1024:
        raise UserError(f"--batch must be between 1 and 1024, got {batch}")
    if workers is not None and not 1 <= workers <= 64:
        raise UserError(f"--workers must be between 1 and 64, got {workers}")
    if filter_memorized and data is None:
        raise UserError("--filter-memorized needs --data: the dataset the model was trained on")
    out = Path(out).expanduser()
    loaded = isinstance(model, LLCMPipeline)
    pipe = model if loaded else load_pipeline(model, adapter=adapter)
    if not pipe.config.classes:
        raise UserError(f"model {model} lists no classes (llcm.json 'classes'); nothing to synthesize")
    table = select_classes(class_table(pipe.config.classes, pipe.config.grayscale, data), classes)
    colour = [c.id for c in table if not c.grayscale]
    if fmt == "nifti" and colour:
        raise UserError(f"NIfTI holds grayscale images only, and {', '.join(colour)} "
                        f"{'is' if len(colour) == 1 else 'are'} RGB: use --format png or dicom, or --classes "
                        "of grayscale modalities")
    w = pipe.config.w_default if w is None else float(w)
    size = pipe.default_size()
    pipe.check_request(steps, w, size, size, 1)
    if seed < 0 or seed + len(pipe.config.classes) * SEED_STRIDE > MAX_SEED:
        raise UserError(f"--seed must be between 0 and {MAX_SEED - len(pipe.config.classes) * SEED_STRIDE}")
    compiled = use_compile(compile)
    settings = settings_of(pipe.model_hash, table, per_class, steps, w, seed, fmt, stack, batch, filter_memorized,
                           size, size, compiled, dtype)
    if workers is None:
        workers = 1 if loaded else default_workers(device, per_class * len(table), filter_memorized)
    if filter_memorized or loaded:
        workers = 1
    state = check_out(out, settings)
    (out / STATE).mkdir(parents=True, exist_ok=True)
    if not state:
        state = {"format": FORMAT, "settings": settings, "started": time.strftime("%Y-%m-%d")}
        atomic_write(out / STATE / "state.json", json.dumps(state, indent=2).encode())
    for cls in table:
        (out / "train" / cls.folder).mkdir(parents=True, exist_ok=True)
    base = {"steps": steps, "w": w, "model_hash": pipe.model_hash, "synthetic": True, "software": __version__,
            "source": f"llcm synthesize ({pipe.name})", "licence": "synthetic images: see the model's licence",
            "width": size, "height": size, "model_name": pipe.name, "dtype": dtype}
    entries = _journal(out)
    rows = {c.folder: [r for e in entries if e["folder"] == c.folder for r in e["rows"]] for c in table}
    bar = tqdm(total=per_class * len(table), desc="synthesize", unit="img", disable=not progress, dynamic_ncols=True,
               initial=sum(r["file_name"] is not None for rs in rows.values() for r in rs))
    clock = {"t0": time.perf_counter(), "first": None, "made": 0, "after_first": 0}

    def record(folder: str, entry_rows: list[dict], start: int | None = None) -> None:
        _append(out, {"folder": folder, "start": start, "rows": entry_rows})
        rows[folder].extend(entry_rows)
        n = sum(r["file_name"] is not None for r in entry_rows)
        clock["made"] += n
        if clock["first"] is None:
            clock["first"] = time.perf_counter()
        else:
            clock["after_first"] += n
        bar.update(n)

    if filter_memorized:
        _filtered_run(pipe, out, table, settings, base, rows, record, MemorizationFilter(data, out / STATE), device)
    else:
        done = {(e["folder"], e["start"]) for e in entries}
        units = [(c, start, min(batch, per_class - start)) for c in table for start in range(0, per_class, batch)
                 if (c.folder, start) not in done]
        if workers == 1:
            place(pipe, device, dtype)
            if compiled:  # in place: the weights' names, and so the model hash, stay as they are
                pipe.components.unet.compile()
                pipe.components.vae.decoder.compile()
            with ThreadPoolExecutor(max_workers=2) as writers:
                maker = BatchMaker(pipe, out, settings, base, writers)
                for c, start, n in units:
                    record(c.folder, maker.unit(c, start, n), start)
        elif units:
            _parallel_run(model, adapter, device, workers, out, settings, base, units, record)
    bar.close()
    seconds = time.perf_counter() - clock["t0"]
    steady = clock["after_first"] / (time.perf_counter() - clock["first"]) if clock["after_first"] else None
    run = {"images": clock["made"], "seconds": round(seconds, 2), "workers": workers, "batch": batch,
           "device": str(device), "compiled": compiled, "dtype": dtype,
           "images_per_s": round(clock["made"] / seconds, 2) if clock["made"] and seconds > 0 else None,
           "steady_images_per_s": round(steady, 2) if steady else None,
           "first_batch_s": round(clock["first"] - clock["t0"], 2) if clock["first"] else None}
    with open(out / STATE / "runs.jsonl", "a", encoding="utf-8") as f:  # timings stay out of the dataset's files
        f.write(json.dumps(run) + "\n")
    for c in table:
        rows[c.folder].sort(key=lambda r: (r["file_name"] is None, r["index"]))
    stats = finish(out, table, rows, settings, pipe, stack, _model_readme(model, adapter))
    stats["this_run"] = run
    return stats


def _parallel_run(model, adapter, device, workers: int, out: Path, settings: dict, base: dict, units, record) -> None:
    """Units spread over worker processes (spawned: each loads the model once, one thread per core); a unit's
    journal line is written when its files are on disk, in whatever order units finish."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    import torch

    threads = max(1, torch.get_num_threads() // workers)
    spec = str(model)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                             initargs=(spec, adapter, device, threads, out, settings, base)) as pool:
        pending = {pool.submit(_worker_unit, c, start, n) for c, start, n in units}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                folder, start, unit_rows = f.result()
                record(folder, unit_rows, start)


def _filtered_run(pipe, out: Path, table: list[SynthClass], settings: dict, base: dict, rows: dict, record,
                  guard: MemorizationFilter, device) -> None:
    """One process, class by class: candidates drawn in order of their seeds, a flagged one dropped (its seed
    recorded) and the class drawing on until it has per_class images."""
    place(pipe, device, settings["dtype"])
    maker = BatchMaker(pipe, out, settings, base)
    per_class, batch = settings["per_class"], settings["batch"]
    for cls in table:
        kept = sum(r["file_name"] is not None for r in rows[cls.folder])
        drawn = len(rows[cls.folder])
        while kept < per_class:
            n = min(batch, per_class - kept)
            seeds = [settings["seed"] + cls.position * SEED_STRIDE + drawn + j for j in range(n)]
            pixels = maker.sample(cls, seeds)
            flagged = guard.flagged(np.stack([np.atleast_3d(p) for p in pixels]))
            entry_rows = []
            for sd, px, bad in zip(seeds, pixels, flagged):
                if bad:
                    entry_rows.append({"seed": sd, "index": kept, "file_name": None, "memorized": True})
                    continue
                entry_rows.append(maker.write(cls, kept, sd, px)[0])
                kept += 1
            drawn += n
            record(cls.folder, entry_rows)


def finish(out: Path, table: list[SynthClass], done: dict[str, list[dict]], settings: dict, pipe, stack: bool,
           model_card: str = "") -> dict:
    """metadata.jsonl, the stacks of a --stack run, stats.json and card.md, from the journal."""
    lines, classes = [], {}
    for cls in table:
        rows = [r for r in done[cls.folder] if r["file_name"] is not None]
        if stack:
            from llcm.medical_files import nifti_bytes

            name = f"{cls.folder}/{cls.folder}.nii.gz"
            if not (out / "train" / name).is_file():
                volume = np.stack([np.load(out / STATE / f"{cls.folder}-{r['index']:06d}.npy") for r in rows])
                atomic_write(out / "train" / name, nifti_bytes(volume, description=f"llcm synthetic {cls.folder}"))
            for r in rows:
                r.update(file_name=name, slice=r["index"])
        for r in rows:
            row = {"file_name": r["file_name"], "text": cls.text, "class": cls.id, **cls.fields,
                   **{k: r[k] for k in ("seed", "steps", "w", "model_hash", "synthetic", "source", "licence",
                                        "width", "height")}, "dtype": r.get("dtype", "fp32")}
            if stack:
                row["slice"] = r["slice"]
            lines.append(json.dumps(row))
        redrawn = sum(1 for r in done[cls.folder] if r.get("memorized"))
        classes[cls.id] = {"prompt": cls.text, "folder": cls.folder, **cls.fields, "train": len(rows), "test": 0,
                           "grayscale": cls.grayscale, "memorized_redrawn": redrawn}
    atomic_write(out / "train" / "metadata.jsonl", ("\n".join(lines) + "\n").encode())
    if stack:
        for f in (out / STATE).glob("*.npy"):
            f.unlink()
    stats = {"format": FORMAT, "synthetic": True, "model": {"name": pipe.name, "hash": pipe.model_hash},
             "settings": settings, "classes": classes, "totals": {"train": len(lines), "test": 0}}
    atomic_write(out / "stats.json", json.dumps(stats, indent=2).encode())
    atomic_write(out / "card.md", render_card(stats, pipe, model_card).encode("utf-8"))
    return stats


def render_card(stats: dict, pipe, model_card: str = "") -> str:
    s = stats["settings"]
    lines = [f"# Synthetic dataset: {stats['totals']['train']} images from {stats['model']['name']} "
             f"({stats['model']['hash']})", "",
             "Every image here was **generated** by a model (`synthetic: true` in each metadata row); none shows a "
             "patient. Use it to augment, pre-train or share, and check it against real data before any claim.", "",
             f"Made by `llcm synthesize`: {s['steps']} consistency steps, guidance w = {s['w']}, seeds "
             f"{s['seed']} + class position x {SEED_STRIDE} + index, networks in {s.get('dtype', 'fp32')}, "
             f"{s['format'].upper()} files"
             f"{' (one NIfTI volume per class)' if s['stack'] else ''}, batches of {s['batch']}"
             f"{', each image checked against the training set for copies (flagged ones redrawn)' if s['filter_memorized'] else ''}.",
             "", "Layout: Hugging Face `imagefolder` (`train/<class>/...`, `train/metadata.jsonl` with `file_name`, "
             "`text`, `class`, the taxonomy fields, `seed`, `steps`, `w`, `model_hash`, `synthetic`), as "
             "`llcm data build` writes it; statistics in `stats.json`.", "", "## Classes", "",
             "| class | modality | channels | images | copies redrawn | prompt |", "|---|---|---|---:|---:|---|"]
    for cid, c in stats["classes"].items():
        lines.append(f"| {cid} | {c.get('modality') or '-'} | {'1 (grayscale)' if c['grayscale'] else '3 (RGB)'} | "
                     f"{c['train']} | {c['memorized_redrawn']} | {c['prompt']} |")
    card = pipe.config.__dict__ if hasattr(pipe, "config") else {}
    lines += ["", "## The model", "", f"Model hash {stats['model']['hash']}; sampler settings (llcm.json): k "
              f"{card.get('k')}, w range [{card.get('w_min')}, {card.get('w_max')}]. Its own card (README.md in the "
              "model folder) says what it was trained on and how well it does.", ""]
    if model_card:
        lines += ["### Model card", "", model_card.strip(), ""]
    return "\n".join(lines)


def _model_readme(model: str, adapter: str | None) -> str:
    """The model folder's own card (README.md), if it has one; an adapter's, else its base's."""
    from llcm.pipeline import resolve_model

    for spec in (adapter, model):
        if spec is None:
            continue
        try:
            card = resolve_model(spec) / "README.md"
        except (UserError, OSError, TypeError):
            continue
        if card.is_file():
            return card.read_text(encoding="utf-8")
    return ""
