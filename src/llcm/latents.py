"""Latents computed once and cached, in safetensors shards that training reads row by row.

A cache folder (format 2, written by :meth:`LatentSet.save` and `llcm encode`):

- ``latents-00000.safetensors``, ``latents-00001.safetensors``, ...: shards of about ``SHARD_MB`` MB, each with
  "latents" [n, C, h, w] (already multiplied by the VAE scaling factor) stored as float16 (`llcm encode`'s
  default), bfloat16 or float32, and "prompt_index" [n] int64 (row of latents.json "prompts"); `llcm encode`
  adds "channel_spread" [n] (each image's colour spread, for ``grayscale``). The safetensors header metadata
  "llcm" (JSON) gives the shard's rows [a, b) of the whole cache, the total count, the VAE hash and the
  encoding plan (so an interrupted `llcm encode` keeps the shards it finished).
- ``latents.json``: ``format`` 2, ``dtype``, ``count``, ``shape`` [C, h, w], ``shards`` (file, rows [a, b),
  bytes, sha256 of each), the prompts, the class of each prompt, the VAE hash the latents came from (a
  different VAE never reuses stale latents), the scaling factor, the split, whether horizontal flips were
  added (never by default: medical left/right matters), the grayscale classes, ...

Reading. :meth:`LatentSet.load` reads latents.json and, of every shard, its header (checked with safetensors'
``safe_open``) and prompt_index: a few KB each, nothing of the latents themselves. ``.latents`` is then a
:class:`ShardedLatents`: ``latents[idx]`` opens only the shards holding those rows, reads the bytes of each run of
consecutive rows at its offset in the file (from the safetensors header) and converts them to float32. Plain
positioned reads rather than safe_open's memory map: the same bytes, but a memory-mapped page fault makes the
kernel read around it (up to the disk's read-ahead: 8 MB on the test machine, where batches of 64 random rows read
2x slower from the page cache and 6x slower from disk that way, docs/scale.md), and mapped pages count in the RSS.
Statistics (:func:`channel_mean`) stream shard by shard; ``to_tensor()`` reads everything (small caches, tests).

Integrity. At load, every shard listed must exist with its recorded size, and its header must show the recorded
dtype, shape, rows and VAE hash (a shard copied from another cache is named). The sha256 of a shard is checked
the first time this process reads any of its rows (``verify="lazy"``, the default: a damaged shard is noticed
before one of its rows is used, and a load reads no latents); ``verify="all"`` hashes every shard at load (`llcm
encode` does it when it finds a cache up to date); ``verify="header"`` skips the hashes. Every read also checks
that the rows are finite.

Old caches (format 1: one float32 ``latents.safetensors`` + latents.json with ``latents_sha256``) still load: whole,
into memory, hashed at load, as before.

A LatentSet is checked when it is made (so also when loaded) and again when saved: floating latents [N, C, h, w],
N >= 1, finite (in-memory latents at once, sharded latents on every read), and an integer prompt_index [N] within
the prompts. So a NaN can never reach a model's llcm.json (``latent_mean``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from llcm.errors import UserError

Tensor = torch.Tensor
REBUILD = "re-run `llcm encode --overwrite` to rebuild it"
FORMAT = 2
SHARD_MB = 256  # shard size of new caches (LatentSet.save and `llcm encode --shard-mb`)
CHUNK_MB = 64  # float32 megabytes per read when streaming a whole cache (channel_mean, to_tensor, save)
LEGACY_FILE = "latents.safetensors"  # format 1
SHARD_FILE = "latents-{:05d}.safetensors"
SHARD_PATTERN = re.compile(r"latents-\d{5}\.safetensors")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DTYPE_NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
SAFETENSORS_DTYPE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
STORAGE_KEYS = ("prompts", "count", "shape", "latents_sha256", "format", "dtype", "shards")  # written by save()


def storage_dtype(name: str | torch.dtype) -> torch.dtype:
    """fp32 | fp16 | bf16 (or float32, float16, bfloat16, or the torch dtype) -> the torch dtype."""
    if isinstance(name, torch.dtype) and name in DTYPE_NAME:
        return name
    if isinstance(name, str) and name.lower() in DTYPES:
        return DTYPES[name.lower()]
    raise UserError(f"latent dtype must be fp32, fp16 or bf16, not {name!r}")


def channel_mean(latents: Tensor | ShardedLatents) -> list[float]:
    """Per-channel mean of [N, C, h, w] latents, as stored in llcm.json (``latent_mean``); a sharded cache is
    streamed shard by shard."""
    if isinstance(latents, ShardedLatents):
        return latents.channel_mean()
    return [round(float(v), 6) for v in latents.double().mean((0, 2, 3))]


def _sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MB blocks (no memory map: the pages do not count in the RSS)."""
    digest, buf = hashlib.sha256(), bytearray(2 ** 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# ------------------------------------------------------------------------------------ writing shards

def shard_rows(count: int, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
               shard_mb: float = SHARD_MB) -> list[tuple[int, int]]:
    """The row ranges [a, b) of a cache's shards: as many rows as fit in `shard_mb` MB (at least one)."""
    if not shard_mb > 0:
        raise UserError(f"shard size must be > 0 MB, got {shard_mb}")
    row_bytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
    per = max(1, int(shard_mb * 2 ** 20) // row_bytes)
    return [(a, min(a + per, count)) for a in range(0, count, per)]


def write_shard(folder: Path, number: int, latents: Tensor, prompt_index: Tensor, dtype: torch.dtype,
                info: dict, extra: dict[str, Tensor] | None = None) -> Path:
    """Write shard `number` of a cache atomically (a temporary file renamed over its name).

    `latents` [n, C, h, w] (any float dtype) are stored as `dtype`; `info` (rows [a, b), count, vae_hash, plan)
    goes to the header metadata "llcm". The bytes depend only on these arguments, never on the process."""
    stored = latents.to(dtype).contiguous()
    if not bool(torch.isfinite(stored).all()):
        bad = "NaN or infinite" if not bool(torch.isfinite(latents).all()) else f"beyond the range of {dtype}"
        raise UserError(f"latent rows {info.get('rows')} are {bad}: refusing to write them"
                        + ("; store them as fp32 or bf16" if "range" in bad else ""))
    path = folder / SHARD_FILE.format(number)
    tmp = folder / f".{path.name}.tmp"
    tensors = {"latents": stored, "prompt_index": prompt_index.long().contiguous(),
               **{k: v.contiguous() for k, v in (extra or {}).items()}}
    save_file(tensors, str(tmp), metadata={"llcm": json.dumps(info, sort_keys=True)})
    os.replace(tmp, path)
    return path


def shard_info(path: Path) -> dict:
    """The "llcm" header metadata of a shard (reads only its header); {} when absent."""
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("llcm", "{}"))


def write_index(folder: Path, ranges: list[tuple[int, int]], dtype: torch.dtype, shape, prompts: list[str],
                meta: dict) -> dict:
    """Hash the shards of `ranges` (already written in `folder`), then write latents.json atomically and remove
    what an earlier cache left there (shards past these, a format-1 latents.safetensors, temporary files)."""
    shards = []
    for i, (a, b) in enumerate(ranges):
        path = folder / SHARD_FILE.format(i)
        shards.append({"file": path.name, "rows": [a, b], "bytes": path.stat().st_size, "sha256": _sha256(path)})
    record = {**{k: v for k, v in meta.items() if k not in STORAGE_KEYS}, "prompts": list(prompts),
              "count": ranges[-1][1], "shape": list(shape), "format": FORMAT, "dtype": DTYPE_NAME[dtype],
              "shards": shards}
    (folder / "latents.json.tmp").write_text(json.dumps(record, indent=2))
    os.replace(folder / "latents.json.tmp", folder / "latents.json")
    keep = {s["file"] for s in shards}
    for p in folder.iterdir():
        stale = SHARD_PATTERN.fullmatch(p.name) and p.name not in keep
        if stale or p.name == LEGACY_FILE or (p.name.startswith(".latents-") and p.name.endswith(".tmp")):
            p.unlink(missing_ok=True)
    return record


# ------------------------------------------------------------------------------------ reading shards

@dataclass(frozen=True)
class Shard:
    path: Path
    start: int  # first row of the whole cache
    stop: int
    nbytes: int
    sha256: str
    offset: int = 0  # of the first latent's bytes in the file (after the safetensors header)


class ShardedLatents:
    """[N, C, h, w] float32 latents read on demand from safetensors shards (see the module docstring).

    ``latents[i]`` accepts an int, a slice, a list, an integer index tensor or a boolean mask (optionally followed
    by indices of the other dimensions) and reads only the shards holding those rows. ``opened`` counts the
    opens of each shard and ``verified`` lists the shards whose sha256 was checked (tests use them)."""

    dtype = torch.float32  # of what reads return
    device = torch.device("cpu")
    ndim = 4

    def __init__(self, folder: Path, shards: list[Shard], shape: tuple[int, ...], stored: torch.dtype,
                 verify: str = "lazy"):
        self.folder, self.shards, self.stored_dtype = Path(folder), list(shards), stored
        self.shape = torch.Size(shape)
        self._starts = torch.tensor([s.start for s in self.shards])
        self._itemsize = torch.tensor([], dtype=stored).element_size()
        self.opened: Counter = Counter()
        self.verified: set[str] = set()
        self.verify_mode = verify
        self._channel_mean: list[float] | None = None
        if verify == "all":
            for i in range(len(self.shards)):
                self._verify(i)

    def __len__(self) -> int:
        return int(self.shape[0])

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return (f"ShardedLatents({list(self.shape)}, {DTYPE_NAME[self.stored_dtype]} in {len(self.shards)} shards "
                f"of {self.folder})")

    def __getattr__(self, name: str):
        # only reached for names this class lacks: a whole-tensor method such as .std() or .mean()
        raise AttributeError(f"ShardedLatents has no {name!r}: it reads rows on demand; index it (latents[idx]), "
                             "use llcm.latents.channel_mean, or read everything with .to_tensor()")

    # -- integrity

    def _verify(self, i: int) -> None:
        shard = self.shards[i]
        if shard.path.name in self.verified or self.verify_mode == "header":
            return
        try:
            digest = _sha256(shard.path)
        except OSError as exc:
            raise UserError(f"{shard.path} cannot be read ({exc.strerror or exc}); {REBUILD}") from None
        if digest != shard.sha256:
            raise UserError(f"{shard.path} is damaged or was changed after it was written (its sha256 differs from "
                            f"the one in latents.json); {REBUILD}")
        self.verified.add(shard.path.name)

    def verify(self) -> None:
        """Check the sha256 of every shard now (reads the whole cache once)."""
        mode, self.verify_mode = self.verify_mode, "lazy"
        try:
            for i in range(len(self.shards)):
                self._verify(i)
        finally:
            self.verify_mode = mode

    # -- reading

    def _read_into(self, i: int, rows: list[int], dest: Tensor, out: Tensor) -> None:
        """Copy the rows `rows` (sorted, of the whole cache, all in shard i) into out[dest], as float32."""
        self._verify(i)
        shard = self.shards[i]
        self.opened[shard.path.name] += 1
        row = self.shape[1:]
        row_bytes = math.prod(row) * self._itemsize
        try:
            with open(shard.path, "rb", buffering=0) as f:
                a = 0
                for b in range(1, len(rows) + 1):  # runs of consecutive rows: one read each
                    if b == len(rows) or rows[b] != rows[b - 1] + 1:
                        buf = bytearray((b - a) * row_bytes)
                        f.seek(shard.offset + (rows[a] - shard.start) * row_bytes)
                        if f.readinto(buf) != len(buf):
                            raise OSError("shorter than its header says")
                        out[dest[a:b]] = torch.frombuffer(buf, dtype=self.stored_dtype).view(b - a, *row).float()
                        a = b
        except OSError as exc:
            raise UserError(f"{shard.path} cannot be read ({exc.strerror or exc}); {REBUILD}") from None

    def _finite(self, out: Tensor, rows: list[int]) -> Tensor:
        # the sum is NaN or infinite if any value is (or, rarely, if huge values overflow: then look closer)
        if not bool(torch.isfinite(out.sum())) and not bool(torch.isfinite(out).all()):
            bad = sorted({rows[j] for j in torch.nonzero(~torch.isfinite(out.flatten(1)).all(1)).flatten().tolist()})
            names = sorted({self.shards[int(torch.searchsorted(self._starts, r, right=True)) - 1].path.name
                            for r in bad})
            raise UserError(f"latent rows {bad[:5]}{'...' if len(bad) > 5 else ''} in {self.folder} "
                            f"({', '.join(names)}) are NaN or infinite; {REBUILD}")
        return out

    def rows(self, index: Tensor) -> Tensor:
        """Latents of the rows `index` (1-D integers, any order, repeats allowed), float32 [len(index), C, h, w]."""
        index = torch.as_tensor(index, dtype=torch.long).flatten()
        n = len(self)
        if len(index) and (int(index.min()) < -n or int(index.max()) >= n):
            raise IndexError(f"row index out of range for {n} latents")
        index = torch.where(index < 0, index + n, index)
        out = torch.empty((len(index), *self.shape[1:]), dtype=torch.float32)
        order = torch.argsort(index, stable=True)
        rows = index[order].tolist()
        which = (torch.searchsorted(self._starts, index[order], right=True) - 1).tolist()
        a = 0
        for b in range(1, len(rows) + 1):  # the rows of each shard, in one open
            if b == len(rows) or which[b] != which[a]:
                self._read_into(which[a], rows[a:b], order[a:b], out)
                a = b
        return self._finite(out, index.tolist())

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            key, rest = (key[0], key[1:]) if key else (slice(None), ())
        if isinstance(key, slice):
            index = torch.arange(len(self))[key]
        else:
            index = key if torch.is_tensor(key) else torch.as_tensor(key)
            if index.dtype == torch.bool:
                if index.shape != self.shape[:1]:
                    raise IndexError(f"a boolean mask of {list(index.shape)} does not match {len(self)} latents")
                index = torch.nonzero(index).flatten()
            elif index.is_floating_point() or index.is_complex() or index.ndim > 1:
                raise IndexError(f"latents are indexed by ints, slices, 1-D integer tensors or masks, not {key!r}")
            elif index.ndim == 0:  # one row: its [C, h, w]
                return self.rows(index.view(1))[0][rest]
        out = self.rows(index)
        return out[(slice(None), *rest)] if rest else out

    def chunks(self, chunk_mb: float = CHUNK_MB) -> Iterator[Tensor]:
        """The whole cache in order, as float32 chunks of at most `chunk_mb` MB (one shard open per chunk)."""
        per = max(1, int(chunk_mb * 2 ** 20) // (math.prod(self.shape[1:]) * 4))
        for i, shard in enumerate(self.shards):
            for a in range(shard.start, shard.stop, per):
                rows = list(range(a, min(a + per, shard.stop)))
                out = torch.empty((len(rows), *self.shape[1:]), dtype=torch.float32)
                self._read_into(i, rows, torch.arange(len(rows)), out)
                yield self._finite(out, rows)

    def channel_mean(self) -> list[float]:
        """Per-channel mean (llcm.json's ``latent_mean``), streamed once over the shards, then remembered (a
        training computes it for every sample grid and for the model it saves)."""
        if self._channel_mean is None:
            sums = torch.zeros(self.shape[1], dtype=torch.float64)
            for chunk in self.chunks():
                sums += chunk.sum((0, 2, 3), dtype=torch.float64)
            self._channel_mean = [round(float(v), 6) for v in sums / (self.shape[0] * self.shape[2] * self.shape[3])]
        return list(self._channel_mean)

    def to_tensor(self) -> Tensor:
        """Every latent as one float32 tensor in memory (4 bytes a value: for small caches and tests)."""
        out = torch.empty(self.shape, dtype=torch.float32)
        for i, shard in enumerate(self.shards):
            self._read_into(i, list(range(shard.start, shard.stop)), torch.arange(shard.start, shard.stop), out)
        return self._finite(out, list(range(len(self))))


def _open_shards(folder: Path, meta: dict, j: Path) -> tuple[list[Shard], Tensor, torch.dtype]:
    """Check latents.json's shard list against the files (sizes and headers only); returns the shards, the
    prompt_index of the whole cache and the stored dtype."""
    try:
        dtype = storage_dtype(meta.get("dtype", ""))
        count, shape = int(meta["count"]), [int(s) for s in meta["shape"]]
        listed = meta["shards"]
        shards = [Shard(folder / s["file"], int(s["rows"][0]), int(s["rows"][1]), int(s["bytes"]), str(s["sha256"]))
                  for s in listed]
        names_ok = all(isinstance(s["file"], str) and SHARD_PATTERN.fullmatch(s["file"]) for s in listed)
    except (UserError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise UserError(f"{j} is damaged (its shard list or dtype: {_first_line(exc)}); {REBUILD}") from None
    bounds = [0] + [s.stop for s in shards]
    if (not names_ok or not shards or len(shape) != 3 or bounds[-1] != count
            or any(s.start != a or s.stop <= s.start for s, a in zip(shards, bounds))):
        raise UserError(f"{j} is damaged (its shards do not cover rows 0..{count} in order); {REBUILD}")
    index = []
    for k, s in enumerate(shards):
        if not s.path.is_file():
            raise UserError(f"{s.path} is missing ({j.name} lists {len(shards)} shards); {REBUILD}")
        try:
            with safe_open(str(s.path), "pt") as f:
                info = json.loads((f.metadata() or {}).get("llcm", "{}"))
                part = f.get_slice("latents")
                found = (SAFETENSORS_DTYPE.get(part.get_dtype()), list(part.get_shape()))
                rows = f.get_tensor("prompt_index")
        except Exception as exc:  # safetensors raises its own error types for a cut or overwritten header
            raise UserError(f"{s.path} is damaged ({_first_line(exc)}); {REBUILD}") from None
        if found != (dtype, [s.stop - s.start, *shape]):
            raise UserError(f"{s.path} holds {found[1]} {found[0]}, but {j.name} records "
                            f"{[s.stop - s.start, *shape]} {dtype}; {REBUILD}")
        vae = info.get("vae_hash")
        if vae != meta.get("vae_hash") and vae is not None:
            raise UserError(f"{s.path} was made by VAE {vae}, but {j.name} records VAE {meta.get('vae_hash')} "
                            f"(a shard of another cache?); {REBUILD}")
        if info.get("rows", [s.start, s.stop]) != [s.start, s.stop]:
            raise UserError(f"{s.path} holds rows {info['rows']}, but {j.name} lists it for "
                            f"{[s.start, s.stop]}; {REBUILD}")
        size = s.path.stat().st_size
        if size != s.nbytes:
            raise UserError(f"{s.path} is damaged ({size} bytes, {j.name} records {s.nbytes}); {REBUILD}")
        if rows.shape != (s.stop - s.start,) or rows.is_floating_point():
            raise UserError(f"{s.path} has no integer prompt_index per latent; {REBUILD}")
        index.append(rows)
        shards[k] = replace(s, offset=_data_offset(s.path, "latents"))
    return shards, torch.cat(index), dtype


def _data_offset(path: Path, name: str) -> int:
    """Where tensor `name`'s bytes start in a safetensors file: after the 8-byte header length and the JSON header
    (the format's specification), at the tensor's first data offset. The header was checked with safe_open."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return 8 + size + int(header[name]["data_offsets"][0])


# ------------------------------------------------------------------------------------ the set

@dataclass
class LatentSet:
    latents: Tensor | ShardedLatents  # [N, C, h, w] float; a ShardedLatents when loaded from a format-2 cache
    prompt_index: Tensor  # [N] long
    prompts: list[str]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise UserError(f"invalid latents: {problem}")
        self.prompt_index = self.prompt_index.long()

    def problem(self) -> str | None:
        """What makes these latents unusable, in a few words; None when they are fine."""
        lat, idx = self.latents, self.prompt_index
        sharded = isinstance(lat, ShardedLatents)
        if not (torch.is_tensor(lat) or sharded) or not torch.is_tensor(idx):
            return "latents and prompt_index must be tensors"
        if not sharded and not lat.is_floating_point():
            return f"latents must be floating point, not {lat.dtype}"
        if lat.ndim != 4 or lat.shape[0] < 1 or 0 in lat.shape:
            return f"latents must be [N, C, h, w] with N >= 1, not {list(lat.shape)}"
        if not sharded and not bool(torch.isfinite(lat).all()):  # sharded: checked on every read
            return f"{int((~torch.isfinite(lat)).sum())} latent values are NaN or infinite"
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool or idx.shape != lat.shape[:1]:
            return f"prompt_index must be {lat.shape[0]} integers (one per latent), not {idx.dtype} {list(idx.shape)}"
        if not isinstance(self.prompts, list) or not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            return "prompts must be a non-empty list of strings"
        if int(idx.min()) < 0 or int(idx.max()) >= len(self.prompts):
            return (f"prompt_index must lie in [0, {len(self.prompts)}) (one row per prompt), "
                    f"found {int(idx.min())}..{int(idx.max())}")
        return None

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    @property
    def classes(self) -> list[str]:
        return self.meta.get("classes", self.prompts)

    def save(self, folder: str | os.PathLike, dtype: str | torch.dtype = "fp32", shard_mb: float = SHARD_MB) -> Path:
        """Write a format-2 cache: shards of `shard_mb` MB stored as `dtype` (fp32 by default: an exact round
        trip, e.g. for replay latents a resumed run reuses; `llcm encode` stores fp16), then latents.json."""
        folder = Path(folder)
        problem = self.problem()  # checked again: tensors can change after the set was made
        if problem:
            raise UserError(f"refusing to write latents to {folder}: {problem}")
        stored = storage_dtype(dtype)
        if isinstance(self.latents, ShardedLatents) and folder.resolve() == self.latents.folder.resolve():
            raise UserError(f"refusing to write latents to {folder}: they are read from there")
        ranges = shard_rows(len(self), self.latents.shape[1:], stored, shard_mb)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "latents.json").unlink(missing_ok=True)  # not a cache until every shard is written
        for i, (a, b) in enumerate(ranges):
            info = {"rows": [a, b], "count": len(self), "vae_hash": self.meta.get("vae_hash"), "plan": None}
            write_shard(folder, i, self.latents[a:b], self.prompt_index[a:b], stored, info)
        write_index(folder, ranges, stored, self.latents.shape[1:], self.prompts, self.meta)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, expect_vae_hash: str | None = None, verify: str = "lazy") -> "LatentSet":
        """Open a cache; `verify` = "lazy" (each shard's sha256 on its first read), "all" (every shard now) or
        "header" (sizes and headers only). A format-1 cache is read whole and hashed now, whatever `verify`."""
        if verify not in ("lazy", "all", "header"):
            raise ValueError(f"verify must be lazy, all or header, not {verify!r}")
        folder = Path(folder)
        f, j = folder / LEGACY_FILE, folder / "latents.json"
        if not j.exists():
            raise UserError(f"{folder} is not a latent cache (latents.json and its shards); "
                            "create one with `llcm encode`")
        try:
            meta = json.loads(j.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{j} is damaged ({exc}); {REBUILD}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("prompts"), list):
            raise UserError(f"{j} is damaged (no list of prompts); {REBUILD}")
        if expect_vae_hash and meta.get("vae_hash") not in (None, expect_vae_hash):
            raise UserError(f"latents in {folder} were made by VAE {meta.get('vae_hash')}, not {expect_vae_hash}; "
                            "re-run `llcm encode` with this model's VAE")
        prompts = meta["prompts"]
        if len(meta.get("classes", prompts)) != len(prompts):
            raise UserError(f"{j} lists {len(meta['classes'])} classes for {len(prompts)} prompts; {REBUILD}")
        if "shards" in meta:
            shards, index, stored = _open_shards(folder, meta, j)
            lat = ShardedLatents(folder, shards, (int(meta["count"]), *meta["shape"]), stored, verify)
            where = j
        else:
            if not f.exists():
                raise UserError(f"{folder} is not a latent cache (latents.json and its shards); "
                                "create one with `llcm encode`")
            lat, index = cls._read_legacy(f, j, meta)
            where = f
        meta.pop("prompts")
        try:
            return cls(lat, index, prompts, meta)
        except UserError as exc:
            raise UserError(f"{where}: {exc}; {REBUILD}") from None

    @staticmethod
    def _read_legacy(f: Path, j: Path, meta: dict) -> tuple[Tensor, Tensor]:
        """A format-1 cache: the single latents.safetensors, whole, checked against its recorded sha256."""
        data = f.read_bytes()
        if meta.get("latents_sha256") not in (None, hashlib.sha256(data).hexdigest()):
            raise UserError(f"{f} is damaged or was changed after it was written (its sha256 differs from the one in "
                            f"latents.json); {REBUILD}")
        try:
            t = load_bytes(data)
        except Exception as exc:  # safetensors raises its own error type for a cut or overwritten file
            raise UserError(f"{f} is damaged ({_first_line(exc)}); {REBUILD}") from None
        lat, idx = t.get("latents"), t.get("prompt_index")
        if lat is None or idx is None:
            raise UserError(f"{f} has the wrong layout: expected latents [N,C,h,w] and prompt_index [N]; {REBUILD}")
        recorded = {"count": meta.get("count", lat.shape[0]), "shape": meta.get("shape", list(lat.shape[1:]))}
        if recorded != {"count": lat.shape[0], "shape": list(lat.shape[1:])}:
            raise UserError(f"{f} holds latents {list(lat.shape)} but {j.name} records {recorded['count']} of "
                            f"{recorded['shape']}; {REBUILD}")
        return (lat.float() if lat.is_floating_point() else lat), idx

    def check_compatible(self, unet) -> None:
        c, h, w = self.latents.shape[1:]
        if c != unet.config.in_channels:
            raise UserError(f"latents have {c} channels but the UNet expects {unet.config.in_channels}")
        if h % 4 or w % 4:
            raise UserError(f"latent size {h}x{w} is not a multiple of 4")


def read_rows(latents: Tensor | ShardedLatents, index: Tensor, keep: slice = slice(None)) -> Tensor:
    """``latents[index]``, read only at the positions `keep` of `index` (the rows of the batch this process
    trains on, see llcm.training); the other rows are zeros, never read."""
    if keep.indices(len(index)) == (0, len(index), 1):
        return latents[index]
    rows = latents[index[keep]]
    out = rows.new_zeros((len(index), *rows.shape[1:]))
    out[keep] = rows
    return out
