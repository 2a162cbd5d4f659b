"""ONE training loop for every llcm training: VAE, teacher, consistency distillation and LCF.

Only the *task* changes: a task owns its networks and a loss callable; the loop owns optimisation,
devices and processes (accelerate), gradient accumulation, checkpoints (safetensors only) with
resume, SIGINT/SIGTERM handling, NaN guards, logging (metrics.jsonl, TensorBoard when installed),
sample grids and the progress bar.

Determinism: every random draw of step n comes from a generator seeded with (seed, n) and is made
for the whole *global* batch before each process takes its slice. So a run resumed from a
checkpoint, or split over several processes, sees exactly the same batches and noise as one
uninterrupted single-process run (tests/test_training.py checks both). Only the *data* of the other
processes' rows is not read: train() sets `task.local_rows` to this process's positions of the global
batch, and a task's draw reads latents there only (llcm.latents.read_rows; the other rows are zeros
that this process never uses).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llcm.errors import UserError
from llcm.fileio import record_name
from llcm.presets import MAX_SEED, MAX_TRAIN_STEPS

Tensor = torch.Tensor


@dataclass
class TrainConfig:
    out: str = "runs/train"
    max_steps: int = 1000
    batch_size: int = 32  # global batch (all processes, all accumulation micro-batches)
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine (to 0 at max_steps, after the warm-up)
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False  # recompute the trained UNet's activations in the backward pass
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end
    progress: bool = True
    time_limit_minutes: float = 0.0  # > 0: end as finished (model saved) after this much training time

    def validate(self) -> None:
        """The one check of the loop's numbers (the CLI's --steps, --lr, ... land here), before anything is written."""
        counts = {"max_steps": 1, "batch_size": 1, "grad_accum": 1, "checkpoint_every": 1, "log_every": 1,
                  "warmup_steps": 0, "sample_every": 0, "keep_checkpoints": 0, "seed": 0}
        for name, least in counts.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.max_steps > MAX_TRAIN_STEPS:
            raise UserError(f"max_steps must be at most {MAX_TRAIN_STEPS:,}, got {self.max_steps:,}")
        if self.seed > MAX_SEED:
            raise UserError(f"seed must be at most {MAX_SEED}, got {self.seed}")
        numbers = {"lr": self.lr, "weight_decay": self.weight_decay, "max_grad_norm": self.max_grad_norm,
                   "time_limit_minutes": self.time_limit_minutes}
        for name, value in numbers.items():
            if not math.isfinite(value) or value < 0:
                raise UserError(f"{name} must be a finite number >= 0, got {value}")
        if self.lr <= 0:
            raise UserError(f"lr must be > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise UserError(f"adam_betas must lie in [0, 1), got {self.adam_betas}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise UserError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise UserError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")


def lr_factor(config: TrainConfig):
    """The learning-rate multiplier at step s: a linear warm-up, then 1 (constant) or a half cosine that
    reaches 0 at max_steps (short runs at a high rate end on a settled iterate instead of a noisy one)."""
    warm = max(1, config.warmup_steps)

    def factor(s: int) -> float:
        up = min(1.0, (s + 1) / warm)
        if config.lr_schedule == "constant":
            return up
        frac = min(1.0, max(0.0, s - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
        return up * 0.5 * (1.0 + math.cos(math.pi * frac))

    return factor


class Task(Protocol):
    """What a training run optimises. See llcm.tasks for the implementations."""

    name: str
    trainable: nn.Module  # the module whose trainable parameters the optimiser updates

    def num_examples(self) -> int: ...

    def loss(self, net: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Per-sample loss [b] for a (local) batch; `net` is `trainable`, possibly wrapped for processes."""

    def draw(self, indices: Tensor, gen: torch.Generator) -> dict[str, Tensor]:
        """The global batch for `indices`: data rows plus every random draw (noise, t, w, dropout); the data
        may be read at `local_rows` only (TaskBase)."""

    def begin(self, out: Path) -> None:
        """Called on the main process once the run folder exists, before the first step (e.g. to cache data
        made for this run, so that --resume reuses it)."""

    def after_step(self) -> None:
        """Called after each optimiser step (e.g. the EMA target update)."""

    def state_modules(self) -> dict[str, nn.Module]:
        """Modules saved in checkpoints besides `trainable` (e.g. an EMA target)."""

    def save_model(self, folder: Path) -> Path:
        """Write the final model folder."""

    def sample_grid(self):  # -> PIL.Image | None
        ...

    def to(self, device: torch.device, mixed_precision: str = "no") -> None:
        """Move the frozen helpers to the training device (TaskBase does it for every nn.Module attribute) and
        hold those that only run forward in the mixed-precision dtype there (frozen_dtype)."""

    def networks(self) -> dict[str, nn.Module]:
        """The task's networks by name (student, teacher, target, text encoder, VAE...), for the --dry-run plan."""


class TaskBase:
    """Defaults for the optional parts of a Task: the loss is `self.loss_fn`, no EMA, no extra state."""

    loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor]
    trained_steps: int = 0  # set by train() before save_model (a time limit can end a run early)
    step: int = 0  # set by train() before each draw, for tasks whose batches follow a curriculum
    max_steps: int = 1
    local_rows: slice = slice(None)  # set by train(): this process's positions of the global batch (see above)

    def loss(self, net: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return self.loss_fn(net, batch)

    def begin(self, out: Path) -> None:
        pass

    def after_step(self) -> None:
        pass

    def state_modules(self) -> dict[str, nn.Module]:
        return {}

    def sample_grid(self):
        return None

    def _modules(self) -> list[tuple[str, nn.Module]]:
        """Every nn.Module attribute, and every nn.Module field of a dataclass attribute (Components), by name."""
        found = []
        for name, value in vars(self).items():
            if isinstance(value, nn.Module):
                found.append((name, value))
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                found += [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)
                          if isinstance(getattr(value, f.name), nn.Module)]
        return found

    def networks(self) -> dict[str, nn.Module]:
        """The task's networks by name, the trainable first, each parameter in one of them only (a module whose
        parameters all belong to an earlier one, e.g. a UNet inside the trainable, is left out). Tasks name
        theirs (student, teacher, target, ...) by overriding this; the --dry-run plan lists them."""
        found, seen = {}, set()
        for name, module in [("trainable", self.trainable), *self._modules()]:
            ids = {id(p) for p in module.parameters()}
            if not ids or ids <= seen:
                continue
            found[name], seen = module, seen | ids
        return found

    def half_networks(self) -> tuple[str, ...]:
        """Names (in networks()) of the frozen networks that only ever run forward inside autocast, and are held
        in the mixed-precision dtype on a GPU (frozen_dtype). None by default."""
        return ()

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """Cast the half_networks() to `dtype` (the student, and what is saved with it, keep theirs)."""
        nets = self.networks()
        for name in self.half_networks():
            nets[name].to(dtype=dtype)

    def to(self, device: torch.device, mixed_precision: str = "no") -> None:
        """Move the frozen helpers (teacher, EMA target, VAE, text encoder) to the training device, and hold the
        half_networks() there in frozen_dtype(device, mixed_precision): fp32 on a CPU, as before.

        accelerate moves only the trainable module; batches are drawn on the CPU and moved per step, so
        the latent cache and prompt tables stay where they are.
        """
        device = torch.device(device)
        for _, module in self._modules():
            module.to(device)
        dtype = frozen_dtype(device.type, mixed_precision)
        if dtype != torch.float32:
            self.cast_frozen(dtype)


HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def frozen_dtype(device_type: str, mixed_precision: str) -> torch.dtype:
    """The dtype of a frozen, forward-only network (a teacher) on the training device: the mixed-precision dtype
    on a GPU, where autocast runs its convolutions and matmuls in that dtype anyway (fp32 weights would only be
    rounded again at every call, at twice the memory); fp32 on any other device, so CPU training is unchanged."""
    if device_type == "cuda" and mixed_precision in HALF_DTYPES:
        return HALF_DTYPES[mixed_precision]
    return torch.float32


def enable_gradient_checkpointing(module: nn.Module) -> int:
    """Turn on diffusers' gradient checkpointing (`enable_gradient_checkpointing`) in every diffusers model inside
    `module` (the trainable: a student's or teacher's UNet): their blocks keep only their inputs in the forward
    pass and recompute the rest in the backward pass. Frozen networks are not touched (they run without grad).
    Returns how many models it was turned on in; raises UserError when none supports it."""
    def walk(m: nn.Module) -> int:
        if getattr(m, "_supports_gradient_checkpointing", False) and hasattr(m, "enable_gradient_checkpointing"):
            m.enable_gradient_checkpointing()  # the whole model, its inner diffusers blocks included
            return 1
        return sum(walk(child) for child in m.children())

    found = walk(module)
    if not found:
        raise UserError(f"--gradient-checkpointing: the trained {type(module).__name__} holds no diffusers model "
                        "that supports gradient checkpointing")
    return found


def writable_folder(path: str | os.PathLike) -> Path:
    """Create `path` if needed and check that a file can be written in it (one clear error if not)."""
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".llcm-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to output folder {path}: {exc.strerror or exc}") from None
    return folder


# what a run writes in its folder (config.json aside): --overwrite removes these, and only these
RUN_ARTEFACTS = ("checkpoints", "model", "samples", "tensorboard", "metrics.jsonl", "summary.json")


def _json_file(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def refuse_overlap(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> None:
    """A run never writes into its inputs: `out` equal to, inside or around any of them is refused."""
    here = Path(out).expanduser().resolve()
    for flag, path in inputs.items():
        if path is None:
            continue
        other = Path(path).expanduser().resolve()
        if here == other or other in here.parents or here in other.parents:
            where = "is" if here == other else "is inside" if other in here.parents else "contains"
            raise UserError(f"--out {out} {where} the input {flag} {path}: a run never writes into its inputs; "
                            "choose another --out")


def check_run_folder(out: str | os.PathLike, command: str, *, max_steps: int, resume: bool = False,
                     overwrite: bool = False, inputs: dict[str, str | os.PathLike | None] | None = None) -> str | None:
    """The one check of a training run's folder, made before anything is read or written.

    `out` may be new or empty; otherwise it must be a run of the same `command` (its config.json says so)
    continued with `resume`, unless `overwrite` (then train() removes the old run's files, RUN_ARTEFACTS).
    Writing into an input folder (or a folder holding one) is refused even with `overwrite`. Returns a
    one-line note when `resume` finds the run finished (its model saved at `max_steps` or beyond): there is
    nothing to do, and a script that resumes every stage goes on."""
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    refuse_overlap(out, inputs or {})
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if not folder.is_dir() or not any(folder.iterdir()) or overwrite:
        return None
    recorded = _json_file(folder / "config.json")
    found = recorded.get("command") or recorded.get("task")
    if not found:
        raise UserError(f"--out {out} is not empty and holds no llcm run: choose a new folder, or pass --overwrite "
                        "to write into it")
    if found != command:
        raise UserError(f"--out {out} holds a {found} run, not {command}: choose another --out, or pass --overwrite "
                        "to replace it")
    summary = _json_file(folder / "summary.json")
    finished = summary.get("status") == "finished" and (folder / "model").is_dir()
    if not resume:
        state = f"finished at step {summary.get('step')}" if finished else "unfinished"
        raise UserError(f"--out {out} already holds a {command} run ({state}): pass --resume to continue it or "
                        "--overwrite to replace it")
    if finished and isinstance(summary.get("step"), int) and summary["step"] >= max_steps:
        return (f"{out} is a finished {command} run (step {summary['step']}, model in {folder / 'model'}): nothing "
                "to resume; a larger --steps trains on, --overwrite starts again")
    return None


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def batch_indices(n: int, batch: int, step: int, seed: int) -> Tensor:
    """Indices of the global batch of `step`: epoch-wise random permutations, deterministic in (seed, step)."""
    per_epoch = max(1, n // batch)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    idx = perm[pos * batch:(pos + 1) * batch]
    if len(idx) < batch:  # fewer examples than one batch: sample with repetition
        idx = torch.cat([idx, perm[torch.randint(n, (batch - len(idx),), generator=step_generator(seed, step, 9))]])
    return idx


def slice_batch(batch: dict[str, Tensor], start: int, stop: int) -> dict[str, Tensor]:
    return {k: v[start:stop] for k, v in batch.items()}


# ------------------------------------------------------------------------------------ checkpoints

def _flatten_optimizer(state: dict) -> tuple[dict[str, Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for pid, s in state["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                meta["scalars"][f"{pid}.{k}"] = v
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _module_state(m: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()}


def save_checkpoint(folder: Path, step: int, task: Task, trainable: nn.Module, optimizer, scheduler,
                    config: TrainConfig) -> Path:
    """Write checkpoint-<step>/ atomically: safetensors for weights and optimiser moments, JSON for the rest."""
    final = folder / f"checkpoint-{step:07d}"
    tmp = folder / f".tmp-checkpoint-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_module_state(trainable), str(tmp / "trainable.safetensors"))
    for name, m in task.state_modules().items():
        save_file(_module_state(m), str(tmp / f"{name}.safetensors"))
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    (tmp / "state.json").write_text(json.dumps({"step": step, "scheduler": scheduler.state_dict(),
                                                "config": _recorded(config), "task": task.name}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def _recorded(config: TrainConfig) -> dict:
    """The configuration as saved files record it: the run folder by name (llcm.fileio.record_name)."""
    return {**dataclasses.asdict(config), "out": record_name(config.out)}


def _step_of(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def _checkpoints(folder: Path) -> list[Path]:
    """The checkpoint-<step> folders in `folder`, intact or not (see resume_point)."""
    return [p for p in folder.glob("checkpoint-*") if p.name.rsplit("-", 1)[1].isdigit()]


def _read_checkpoint(path: Path, task: Task) -> dict:
    """Every file of checkpoint `path`, read and parsed (raises if one is missing or damaged)."""
    state = json.loads((path / "state.json").read_text())
    return {"step": int(state["step"]), "scheduler": state["scheduler"],
            "trainable": load_file(str(path / "trainable.safetensors")),
            "modules": {name: load_file(str(path / f"{name}.safetensors")) for name in task.state_modules()},
            "optimizer": _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")),
                                              json.loads((path / "optimizer.json").read_text()))}


def resume_point(folder: Path, task: Task, say: Callable[[str], None] = print) -> dict | None:
    """The newest checkpoint in `folder` whose files all read back (see _read_checkpoint), or None.

    A damaged one (a cut safetensors file, a missing state.json) is passed over, and `say` tells which."""
    bad = []
    for path in sorted(_checkpoints(folder), key=_step_of, reverse=True):
        try:
            ck = _read_checkpoint(path, task)
        except Exception as exc:  # noqa: BLE001  (safetensors, json, a missing file: all mean "damaged")
            bad.append(f"{path.name} ({type(exc).__name__})")
            continue
        if bad:
            say(f"damaged checkpoint {', '.join(bad)} skipped; resuming from {path.name}")
        return {**ck, "path": path}
    if bad:
        say(f"no usable checkpoint in {folder} (damaged: {', '.join(bad)}); starting from step 0")
    return None


def load_checkpoint(ck: dict, task: Task, trainable: nn.Module, optimizer, scheduler) -> int:
    """Put a checkpoint read by resume_point into the run's modules; returns its step."""
    trainable.load_state_dict(ck["trainable"])
    for name, m in task.state_modules().items():
        m.load_state_dict(ck["modules"][name])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    return ck["step"]


# ------------------------------------------------------------------------------------ the loop

class _StopFlag:
    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        self.signal = signum


def _writer(out: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: metrics.jsonl only
        return None
    return SummaryWriter(str(out / "tensorboard"))


def train(task: Task, config: TrainConfig, resume: bool = False, dry_run: bool = False,
          accelerator=None, extra_config: dict | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) a training; returns a summary. The final model goes to <out>/model.

    `resume` continues from the newest intact checkpoint in <out>/checkpoints; `overwrite` first removes an
    earlier run's files from <out> (RUN_ARTEFACTS). Which folders may be used at all is check_run_folder's
    business: the CLI calls it before loading anything."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    config.validate()
    acc = accelerator or Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    world, rank = acc.num_processes, acc.process_index
    local_batch, rem = divmod(config.batch_size, world * config.grad_accum)
    if rem or local_batch < 1:
        raise UserError(f"batch_size {config.batch_size} must be a multiple of processes x grad_accum "
                        f"({world} x {config.grad_accum})")
    out = Path(config.out)
    record = {"task": task.name, "train": _recorded(config), "processes": world,
              "device": str(acc.device), **(extra_config or {})}
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(task.trainable)
    if acc.is_main_process:
        print(json.dumps(record, indent=2, default=str))
    if dry_run:  # and the plan, when the task holds networks (`train vae` passes a stand-in); writes nothing
        plan = plan_run(task, config, acc) if isinstance(getattr(task, "trainable", None), nn.Module) else None
        if acc.is_main_process and plan is not None:
            print(format_plan(plan))
            print(json.dumps({"plan": plan}))
        return {"dry_run": True, "config": record, "plan": plan}
    say = print if acc.is_main_process else (lambda message: None)
    ck = resume_point(out / "checkpoints", task, say) if resume else None
    if ck is not None and ck["step"] > config.max_steps:
        raise UserError(f"{ck['path']} is at step {ck['step']}, past --steps {config.max_steps}: give --steps "
                        f"{ck['step']} or more to continue that run")
    if acc.is_main_process:
        writable_folder(out)
        if overwrite and not resume and (out / "config.json").is_file():  # an earlier llcm run: replace it
            for name in RUN_ARTEFACTS:
                shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)
        (out / "config.json").write_text(json.dumps(record, indent=2, default=str))
        task.begin(out)
    n = task.num_examples()
    if n < 1:
        raise UserError("the dataset is empty")

    trainable = task.trainable
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.adam_betas),
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config))
    model, optimizer = acc.prepare(trainable, optimizer)
    task.to(acc.device, config.mixed_precision)

    step = 0
    if ck is not None:
        step = load_checkpoint(ck, task, acc.unwrap_model(model), optimizer, scheduler)
        say(f"resumed from {ck['path']} at step {step}")
        del ck
    elif resume and not any(_checkpoints(out / "checkpoints")):
        say(f"no checkpoint in {out / 'checkpoints'}; starting from step 0")

    stop = _StopFlag()  # on every process: schedulers signal all ranks, or sometimes only one
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)} if _in_main_thread() else {}
    writer = _writer(out, acc.is_main_process)
    log_file = open(out / "metrics.jsonl", "a") if acc.is_main_process else None
    bar = tqdm(total=config.max_steps, initial=step, desc=task.name, disable=not (config.progress and
               acc.is_main_process), dynamic_ncols=True)
    last_loss, t_last, seen_since = float("nan"), time.perf_counter(), 0
    deadline = t_last + 60 * config.time_limit_minutes if config.time_limit_minutes > 0 else math.inf
    status, timed_out, interrupted = "finished", False, False
    per_rank = local_batch * config.grad_accum
    task.local_rows = slice(rank * per_rank, (rank + 1) * per_rank) if world > 1 else slice(None)
    try:
        while step < config.max_steps:
            gen = step_generator(config.seed, step)
            idx = batch_indices(n, config.batch_size, step, config.seed)
            task.step, task.max_steps = step, config.max_steps
            batch = task.draw(idx, gen)  # every random draw of the global batch; data of the local rows only
            local = slice_batch(batch, rank * per_rank, (rank + 1) * per_rank)
            total = torch.zeros((), device=acc.device)
            for micro in range(config.grad_accum):
                mb = {k: v.to(acc.device) for k, v in slice_batch(local, micro * local_batch,
                                                                  (micro + 1) * local_batch).items()}
                sync = micro == config.grad_accum - 1
                ctx = acc.no_sync(model) if not sync and world > 1 else contextlib.nullcontext()
                with ctx, acc.autocast():
                    loss = task.loss(model, mb).mean() / config.grad_accum
                    acc.backward(loss)
                total += loss.detach()
            loss_value = float(acc.reduce(total, reduction="mean"))
            if not math.isfinite(loss_value):
                status = "nan"
                raise FloatingPointError(
                    f"loss became {loss_value} at step {step}; stopped. The last good checkpoint in "
                    f"{out / 'checkpoints'} is kept: resume with a lower learning rate (--lr) or fp32")
            grad_norm = acc.clip_grad_norm_(model.parameters(), config.max_grad_norm) \
                if config.max_grad_norm > 0 else torch.tensor(0.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            task.after_step()
            step += 1
            seen_since += config.batch_size
            last_loss = loss_value
            if acc.is_main_process:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4g}")
                if step % config.log_every == 0 or step == config.max_steps:
                    now = time.perf_counter()
                    rec = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                           "grad_norm": float(grad_norm), "images_per_s": seen_since / max(now - t_last, 1e-9)}
                    t_last, seen_since = now, 0
                    log_file.write(json.dumps(rec) + "\n")
                    log_file.flush()
                    if writer:
                        for k, v in rec.items():
                            if k != "step":
                                writer.add_scalar(f"train/{k}", v, step)
                if config.sample_every and step % config.sample_every == 0:
                    _save_sample(task, out, step, writer)
            # every process must agree to stop at the same step, or they diverge at the next collective:
            # one reduce of both flags (time limit, signal), > 0 when any process raised one
            flags = torch.tensor([time.perf_counter() > deadline, stop.signal is not None], dtype=torch.float32,
                                 device=acc.device)
            timed_out, interrupted = (acc.reduce(flags, reduction="sum") > 0).tolist()
            if step % config.checkpoint_every == 0 or step == config.max_steps or interrupted or timed_out:
                acc.wait_for_everyone()
                if acc.is_main_process:
                    save_checkpoint(out / "checkpoints", step, task, acc.unwrap_model(model), optimizer,
                                    scheduler, config)
                    _prune(out / "checkpoints", config.keep_checkpoints, step)
            if interrupted:
                status = "interrupted"
                if acc.is_main_process:
                    by = f"signal {stop.signal}" if stop.signal else "a signal to another process"
                    print(f"\nstopped by {by} at step {step}; checkpoint saved. Continue with --resume.",
                          file=sys.stderr)
                break
            if timed_out:
                if acc.is_main_process:
                    print(f"\ntime limit of {config.time_limit_minutes:g} min reached at step {step} of "
                          f"{config.max_steps}; saving the model (--resume with more time continues).",
                          file=sys.stderr)
                break
    finally:
        task.local_rows = slice(None)
        bar.close()
        for s, h in old.items():
            signal.signal(s, h)
        if log_file:
            log_file.close()
    summary = {"task": task.name, "status": status, "step": step, "out": str(out),
               "loss": last_loss if math.isfinite(last_loss) else None}  # None: no step ran (resumed at the end)
    if timed_out:
        summary["stopped_by"] = f"time limit ({config.time_limit_minutes:g} min) at step {step} of {config.max_steps}"
    if status == "finished":
        acc.wait_for_everyone()
        if acc.is_main_process:
            task.trained_steps = step
            folder = task.save_model(out / "model")
            summary["model"] = str(folder)
            _save_sample(task, out, step, writer)
            saved = {**summary, "out": record_name(summary["out"]), "model": record_name(summary["model"])}
            (out / "summary.json").write_text(json.dumps(saved, indent=2))
    if writer:
        writer.close()
    return summary


def _save_sample(task: Task, out: Path, step: int, writer) -> None:
    img = task.sample_grid()
    if img is None:
        return
    (out / "samples").mkdir(exist_ok=True)
    img.save(out / "samples" / f"step-{step:07d}.png")
    if writer:
        import numpy as np

        writer.add_image("samples", np.asarray(img), step, dataformats="HWC")


def _prune(folder: Path, keep: int, step: int) -> None:
    """Keep the newest `keep` checkpoints up to `step`; any beyond `step` belong to an abandoned run (a damaged
    checkpoint passed over on resume) and go too."""
    cks = sorted(_checkpoints(folder), key=_step_of)
    stale = [p for p in cks if _step_of(p) > step]
    kept = [p for p in cks if _step_of(p) <= step]
    for p in stale + (kept[:-keep] if keep > 0 else []):
        shutil.rmtree(p, ignore_errors=True)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------------------ the plan (--dry-run)

# A trained network above this many parameters is run at full size on a CPU at micro-batch 1 only (one SD-1.5 step
# takes minutes there), with small latent crops for the rest (measure_activations).
CPU_FULL_SIZE_MAX_PARAMS = 100_000_000
ADAMW_MOMENTS = 2  # exp_avg and exp_avg_sq, each like the parameter (fp32: accelerate keeps fp32 master weights)


def _peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Bytes allocated at the peak of fn() beyond those allocated before it: CUDA's allocator statistics on a GPU;
    elsewhere the allocations and frees of torch's CPU allocator in the order the profiler recorded them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with _fd2_hidden(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:  # every allocation and free, as the profiler recorded them (kineto's raw events)
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
    except AttributeError:  # a torch without them: each operator's net bytes at its start, which misses the
        # temporaries an operator frees itself (SD-1.5 on 16x16 crops: a peak 40% lower; the same at full size)
        events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _fd2_hidden():
    """Kineto writes a profiler_start / profiler_stop line straight to file descriptor 2 for every profile: hide them
    (and anything else written there meanwhile; the measured step's errors still raise)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _latent_unit(module: nn.Module) -> int | None:
    """The side (in latent cells) a UNet's input must be a multiple of: 2^(levels - 1); None without a UNet."""
    for m in module.modules():
        config = getattr(m, "config", None)
        if isinstance(config, dict) and "block_out_channels" in config and "sample_size" in config:
            return 2 ** (len(config["block_out_channels"]) - 1)
    return None


def measure_activations(task: Task, config: TrainConfig, device: torch.device,
                        autocast: Callable = contextlib.nullcontext) -> dict:
    """The trainable's activation memory: the peak of what one forward + backward of the task's loss allocates
    beyond the weights and the gradients (allocated before measuring, and counted apart), measured at micro-batch
    1 and 2 so that a + b x micro-batch separates what does not grow with the batch (autocast's copies of the
    weights, the largest gradient temporaries) from what each image adds.

    A large network on a CPU (more than CPU_FULL_SIZE_MAX_PARAMS parameters: an SD-1.5 UNet, whose full-size
    step there takes minutes and 15 GB) runs at full size at micro-batch 1 only; the part that does not grow with
    the batch comes from latent crops of a quarter of the side at micro-batch 1 and 2. (Extrapolating from crops
    alone came out 12-28% low at SD-1.5 size: activations grow faster than the latent pixels; docs/scale.md.)
    Nothing is updated: the gradients are dropped afterwards."""
    net = task.trainable
    params = [p for p in net.parameters() if p.requires_grad]
    n = task.num_examples()
    task.step, task.max_steps = 0, config.max_steps

    def batch_of(b: int, side: int | None = None) -> dict[str, Tensor]:
        batch = task.draw(batch_indices(n, b, 0, config.seed), step_generator(config.seed, 0))
        if side is not None:
            h, w = batch["z0"].shape[-2:]
            batch = {k: v[..., :side, :side] if v.ndim == 4 and tuple(v.shape[-2:]) == (h, w) else v
                     for k, v in batch.items()}
        return {k: v.to(device).contiguous() for k, v in batch.items()}

    def peak(batch: dict[str, Tensor]) -> int:
        for p in params:  # allocated before measuring: backward accumulates into them, as from step 2 on
            p.grad = torch.zeros_like(p)

        def step():
            with autocast():
                loss = task.loss(net, batch).mean()
                loss.backward()
        try:
            return _peak_bytes(step, device)
        finally:
            for p in params:
                p.grad = None

    probe = task.draw(batch_indices(n, 1, 0, config.seed), step_generator(config.seed, 0))
    unit = _latent_unit(net)
    size = tuple(probe["z0"].shape[-2:]) if "z0" in probe else None
    big = device.type != "cuda" and sum(p.numel() for p in net.parameters()) > CPU_FULL_SIZE_MAX_PARAMS
    side = max(unit, min(size) // 4 // unit * unit) if unit and size else 0  # a crop of a quarter of the side
    if big and side and side < min(size):
        c1, c2, m1 = peak(batch_of(1, side)), peak(batch_of(2, side)), peak(batch_of(1))
        fixed = max(0, 2 * c1 - c2)
        per_image = max(0, m1 - fixed)
        method = (f"measured: one forward+backward at full size and micro-batch 1; the part that does not grow "
                  f"with the batch from {side}x{side} latent crops at micro-batch 1 and 2")
        runs = [[1, side, c1], [2, side, c2], [1, size[0], m1]]
    else:
        m1, m2 = peak(batch_of(1)), peak(batch_of(2))
        per_image, fixed = max(0, m2 - m1), max(0, 2 * m1 - m2)
        method = "measured: one forward+backward at micro-batch 1 and 2, a + b x micro-batch"
        runs = [[1, size[0] if size else None, m1], [2, size[0] if size else None, m2]]
    how = "CUDA max_memory_allocated" if device.type == "cuda" else "torch CPU allocator, profiler"
    return {"method": f"{method} ({how})", "fixed": int(fixed), "per_image": int(per_image),
            "runs": [{"batch": b, "latent_side": side, "peak_bytes": int(m)} for b, side, m in runs]}


def network_rows(task: Task, device_type: str, mixed_precision: str) -> list[dict]:
    """Parameters per network (all / trainable), the dtype it is held in on the device, and its bytes there."""
    half, cast = set(task.half_networks()), frozen_dtype(device_type, mixed_precision)
    rows = []
    for name, m in task.networks().items():
        tensors = list(m.parameters()) + list(m.buffers())
        held = cast if name in half and cast != torch.float32 else None

        def size(t: Tensor) -> int:
            return t.numel() * (held.itemsize if held is not None and t.is_floating_point() else t.element_size())
        params = list(m.parameters())
        dtype = held or (params[0].dtype if params else torch.float32)
        rows.append({"name": name, "parameters": sum(p.numel() for p in params),
                     "trainable": sum(p.numel() for p in params if p.requires_grad),
                     "dtype": str(dtype).replace("torch.", ""), "bytes": sum(size(t) for t in tensors),
                     "trainable_bytes": sum(p.numel() * p.element_size() for p in params if p.requires_grad)})
    return rows


def memory_plan(rows: list[dict], activations: dict | None, config: TrainConfig, processes: int = 1,
                device_type: str = "cpu") -> dict:
    """The memory of one process from the network table and the activation measurement (pure arithmetic):
    weights, gradients (like the trainable parameters), AdamW's two moments, DDP's gradient buckets when there are
    several processes (one more copy of the gradients), and activations = a + b x micro-batch."""
    per_process = config.batch_size // processes
    micro = per_process // config.grad_accum
    grads = sum(r["trainable_bytes"] for r in rows)
    memory = {"weights": sum(r["bytes"] for r in rows), "gradients": grads, "optimizer": ADAMW_MOMENTS * grads,
              "gradient_buckets": grads if processes > 1 else 0,
              "activations": None if activations is None else activations["fixed"] + activations["per_image"] * micro}
    memory["total"] = sum(v for v in memory.values() if v is not None)
    return {"device": device_type, "processes": processes, "mixed_precision": config.mixed_precision,
            "gradient_checkpointing": config.gradient_checkpointing,
            "images_per_step": {"global_batch": config.batch_size, "processes": processes, "per_process": per_process,
                                "grad_accum": config.grad_accum, "micro_batch": micro},
            "parameters": {"trainable": sum(r["trainable"] for r in rows),
                           "frozen": sum(r["parameters"] - r["trainable"] for r in rows)},
            "networks": rows, "memory": memory, "activations": activations}


def plan_run(task: Task, config: TrainConfig, accelerator) -> dict:
    """What --dry-run prints besides the config: parameters per network, memory per process, images per step.
    Moves the networks to the accelerator's device (as the run would) and measures the activations there."""
    device = accelerator.device
    task.trainable.to(device)
    task.to(device, config.mixed_precision)
    activations = measure_activations(task, config, device, accelerator.autocast)
    plan = memory_plan(network_rows(task, device.type, config.mixed_precision), activations, config,
                       accelerator.num_processes, device.type)
    if device.type == "cuda":
        plan["device_memory"] = torch.cuda.get_device_properties(device).total_memory
    return plan


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_plan(plan: dict) -> str:
    """The plan as the table --dry-run prints."""
    ips, mem, act = plan["images_per_step"], plan["memory"], plan["activations"]
    lines = [f"plan, per process: device {plan['device']}, mixed precision {plan['mixed_precision']}, gradient "
             f"checkpointing {'on' if plan['gradient_checkpointing'] else 'off'}",
             f"images per step: global batch {ips['global_batch']} = {ips['processes']} process"
             f"{'es' if ips['processes'] > 1 else ''} x "
             f"{ips['per_process']}; grad accumulation {ips['grad_accum']}: micro-batches of {ips['micro_batch']}",
             f"{'network':<16}{'parameters':>15}{'trainable':>15}  {'dtype':<10}{'weights':>12}"]
    for r in plan["networks"]:
        lines.append(f"{r['name']:<16}{r['parameters']:>15,}{r['trainable']:>15,}  {r['dtype']:<10}"
                     f"{_bytes(r['bytes']):>12}")
    p = plan["parameters"]
    lines.append(f"{'all':<16}{p['trainable'] + p['frozen']:>15,}{p['trainable']:>15,}")
    why = {"weights": "every network above, in its dtype on the device",
           "gradients": "one per trainable parameter, in its dtype",
           "optimizer": "AdamW: 2 moments per trainable parameter (fp32 master weights under mixed precision)",
           "gradient_buckets": "DDP's copy of the gradients (several processes)",
           "activations": "-" if act is None else
           f"{_bytes(act['fixed'])} + {_bytes(act['per_image'])} x micro-batch {ips['micro_batch']}; {act['method']}",
           "total": "estimated peak of one process"}
    lines.append("memory per process:")
    for key, value in mem.items():
        if key == "gradient_buckets" and not value:
            continue
        lines.append(f"  {key.replace('_', ' '):<18}{_bytes(value):>12}  {why[key]}")
    lines.append("  not counted: the latent cache and prompt tables in host memory, the CUDA context (about 0.5 GiB "
                 "per GPU), allocator fragmentation")
    if plan.get("device_memory"):
        room = plan["device_memory"]
        verdict = "fits" if mem["total"] <= 0.9 * room else (
            "does not fit: try --gradient-checkpointing, or --grad-accum N (the same global batch in N micro-batches)"
            if mem["total"] > room else "is within 10% of it: little room for fragmentation")
        lines.append(f"this GPU has {_bytes(room)}: the plan {verdict}")
    return "\n".join(lines)
