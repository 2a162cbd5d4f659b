"""Sharded latent caches (format 2): round trips, lazy reads, integrity, multi-process encoding, training.

Small shapes and tiny shards (a few rows each) force several shards everywhere. The two-process encoding is run
for real once (torchrun, ~10 s) and its per-shard split is also checked in-process with two simulated ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import llcm.latents as latents_module
from cli_checks import one_error_line
from llcm.cli import main
from llcm.errors import UserError
from llcm.latents import LatentSet, ShardedLatents, channel_mean, read_rows

HERE = Path(__file__).parent
ROW_FP16 = 4 * 8 * 8 * 2  # bytes of one 4x8x8 latent in fp16


def rows_mb(rows: int, row_bytes: int = ROW_FP16) -> float:
    """A --shard-mb that holds `rows` rows."""
    return rows * row_bytes / 2 ** 20


def small(n: int = 40, vae: str = "aaaaaaaaaaaa", seed: int = 0) -> LatentSet:
    g = torch.Generator().manual_seed(seed)
    return LatentSet(torch.randn(n, 4, 8, 8, generator=g) * 2, torch.arange(n) % 3, ["a", "b", "c"],
                     {"vae_hash": vae, "classes": ["A", "B", "C"], "grayscale": ["a"]})


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest's: one torch thread for the module


# ------------------------------------------------------------------------------------ format and reads

@pytest.mark.parametrize("dtype, torch_dtype, tol, shards", [("fp32", torch.float32, 0.0, 8),
                                                             ("fp16", torch.float16, 2 ** -11, 4),
                                                             ("bf16", torch.bfloat16, 2 ** -8, 4)])
def test_round_trip_in_each_dtype(tmp_path, dtype, torch_dtype, tol, shards):
    data = small()
    data.save(tmp_path / "c", dtype=dtype, shard_mb=rows_mb(10))
    meta = json.loads((tmp_path / "c" / "latents.json").read_text())
    assert (meta["format"], meta["count"], meta["shape"], meta["dtype"]) == (2, 40, [4, 8, 8], str(torch_dtype)[6:])
    assert len(meta["shards"]) == shards and meta["shards"][-1]["rows"][1] == 40
    assert sorted(files(tmp_path / "c")) == sorted([s["file"] for s in meta["shards"]] + ["latents.json"])
    for s in meta["shards"]:
        assert s["sha256"] == latents_module._sha256(tmp_path / "c" / s["file"])
    back = LatentSet.load(tmp_path / "c")
    assert isinstance(back.latents, ShardedLatents) and back.latents.shape == (40, 4, 8, 8) and len(back) == 40
    x = back.latents.to_tensor()
    assert x.dtype == torch.float32 and torch.equal(x, data.latents.to(torch_dtype).float())
    assert ((x - data.latents).abs() <= tol * data.latents.abs() + 1e-7).all()  # within the dtype's rounding
    assert torch.equal(back.prompt_index, data.prompt_index) and back.prompts == data.prompts
    assert back.classes == ["A", "B", "C"] and back.meta["vae_hash"] == data.meta["vae_hash"]
    assert channel_mean(back.latents) == channel_mean(x)
    idx = torch.tensor([39, 0, 17, 17, 5, -1])
    assert torch.equal(back.latents[idx], x[idx]) and torch.equal(back.latents[3], x[3])
    mask = data.prompt_index == 1
    assert torch.equal(back.latents[mask], x[mask]) and torch.equal(back.latents[7:33:4, 1], x[7:33:4, 1])
    with pytest.raises(AttributeError, match="to_tensor"):
        back.latents.std()
    # a loaded set saves elsewhere (streamed), never onto the shards it reads
    back.save(tmp_path / "again", dtype=dtype, shard_mb=rows_mb(10))
    assert files(tmp_path / "again") == files(tmp_path / "c")
    with pytest.raises(UserError, match="read from there"):
        back.save(tmp_path / "c")


def test_fp16_overflow_is_refused_not_written(tmp_path):
    big = LatentSet(torch.full((2, 4, 8, 8), 1e6), torch.zeros(2, dtype=torch.long), ["x"])
    with pytest.raises(UserError, match="range of torch.float16"):
        big.save(tmp_path / "c", dtype="fp16")
    assert not (tmp_path / "c" / "latents.json").exists()
    big.save(tmp_path / "c", dtype="bf16")


def test_a_format_1_cache_still_loads(tmp_path):
    """The single-file layout of earlier llcm versions: read whole (a tensor), hashed at load; saving it again
    writes shards and removes the old file."""
    data = small(12)
    old = tmp_path / "old"
    old.mkdir()
    f = old / "latents.safetensors"
    save_file({"latents": data.latents, "prompt_index": data.prompt_index}, str(f))
    (old / "latents.json").write_text(json.dumps({"vae_hash": "aaaaaaaaaaaa", "prompts": data.prompts, "count": 12,
                                                  "shape": [4, 8, 8],
                                                  "latents_sha256": latents_module._sha256(f)}))
    back = LatentSet.load(old, expect_vae_hash="aaaaaaaaaaaa")
    assert torch.is_tensor(back.latents) and torch.equal(back.latents, data.latents)
    assert torch.equal(read_rows(back.latents, torch.tensor([3, 1, 2, 0]), slice(1, 3))[1:3], data.latents[[1, 2]])
    back.save(old, shard_mb=rows_mb(5, ROW_FP16 * 2))
    assert sorted(files(old)) == ["latents-00000.safetensors", "latents-00001.safetensors",
                                  "latents-00002.safetensors", "latents.json"]
    assert torch.equal(LatentSet.load(old).latents.to_tensor(), data.latents)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    save_file({"latents": data.latents, "prompt_index": data.prompt_index}, str(damaged / "latents.safetensors"))
    (damaged / "latents.json").write_text(json.dumps({"prompts": data.prompts, "latents_sha256": "0" * 64}))
    with pytest.raises(UserError, match="sha256 differs"):
        LatentSet.load(damaged)


def test_reads_touch_only_the_shards_they_need(tmp_path, monkeypatch):
    small().save(tmp_path / "c", dtype="fp16", shard_mb=rows_mb(10))  # shards of rows 0-9, 10-19, 20-29, 30-39
    hashed = []
    real = latents_module._sha256
    monkeypatch.setattr(latents_module, "_sha256", lambda p: hashed.append(p.name) or real(p))
    data = LatentSet.load(tmp_path / "c")
    lat = data.latents
    assert not lat.opened and not hashed  # a load reads headers and prompt indices, no latents, no hashes
    lat[torch.tensor([13, 35, 12])]
    assert lat.opened == {"latents-00001.safetensors": 1, "latents-00003.safetensors": 1}
    assert hashed == ["latents-00001.safetensors", "latents-00003.safetensors"]  # checked on first touch
    lat[torch.tensor([19, 10])]
    assert lat.opened["latents-00001.safetensors"] == 2 and len(hashed) == 2  # ... once
    # a rank's share of a batch: only its rows are read, the others stay zeros
    z = read_rows(lat, torch.tensor([0, 1, 25, 26]), slice(2, 4))
    assert set(lat.opened) == {"latents-00001.safetensors", "latents-00002.safetensors", "latents-00003.safetensors"}
    assert (z[:2] == 0).all() and torch.equal(z[2:], lat[torch.tensor([25, 26])])
    hashed.clear()
    LatentSet.load(tmp_path / "c", verify="all")
    assert len(hashed) == 4
    hashed.clear()
    LatentSet.load(tmp_path / "c", verify="header").latents.to_tensor()
    assert not hashed
    assert channel_mean(lat) == channel_mean(lat.to_tensor())


# ------------------------------------------------------------------------------------ integrity

def damage(folder: Path, how: str, tmp: Path) -> str:
    """Break shard 1 of the cache in `folder`; returns the words the error must contain."""
    shard = folder / "latents-00001.safetensors"
    if how == "missing":
        shard.unlink()
        return "missing"
    if how == "cut":
        shard.write_bytes(shard.read_bytes()[:-100])
        return "damaged"
    if how == "changed":
        raw = bytearray(shard.read_bytes())
        raw[-1] ^= 0x01  # still a valid shard of the right size, with other latents
        shard.write_bytes(bytes(raw))
        return "sha256 differs"
    assert how == "other VAE"
    meta = json.loads((folder / "latents.json").read_text())
    other = small(meta["count"], vae="bbbbbbbbbbbb", seed=1)
    other.save(tmp / "other", dtype=meta["dtype"], shard_mb=rows_mb(10))
    shutil.copy(tmp / "other" / shard.name, shard)
    return "made by VAE bbbbbbbbbbbb"


@pytest.mark.parametrize("how", ["missing", "cut", "changed", "other VAE"])
def test_a_broken_shard_is_one_clear_line(tmp_path, how):
    small().save(tmp_path / "c", dtype="fp16", shard_mb=rows_mb(10))
    words = damage(tmp_path / "c", how, tmp_path)
    with pytest.raises(UserError) as err:
        data = LatentSet.load(tmp_path / "c")
        data.latents[torch.tensor([0, 1])]  # shard 0 is intact
        assert how == "changed"  # noticed on the first read of shard 1, not at load
        data.latents[torch.tensor([15])]
    message = str(err.value)
    assert words in message and "latents-00001.safetensors" in message and "\n" not in message
    assert "llcm encode --overwrite" in message


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """12 images, a random micro VAE, --flip: 24 rows in shards of 5 (shard 2 holds originals and flips)."""
    from test_vae_encode import make_dataset, micro_preset

    from llcm.vae import build_vae

    tmp = tmp_path_factory.mktemp("enc")
    data = make_dataset(tmp / "data", per_class=(4, 0))
    preset = json.loads(micro_preset(tmp / "micro.json").read_text())
    for seed in (0, 1):
        build_vae(preset["vae"], seed=seed).save_pretrained(tmp / f"vae{seed}")
    argv = ["encode", "--data", str(data), "--model", str(tmp / "vae0"), "--flip", "--batch", "3",
            "--shard-mb", str(rows_mb(5)), "--quiet"]
    assert main([*argv, "--out", str(tmp / "lat")]) == 0
    return {"tmp": tmp, "data": data, "argv": argv, "lat": tmp / "lat"}


def test_encode_writes_fp16_shards(encoded):
    meta = json.loads((encoded["lat"] / "latents.json").read_text())
    assert meta["dtype"] == "float16" and meta["count"] == 24 and meta["flip"] is True and meta["images"] == 12
    assert [s["rows"] for s in meta["shards"]] == [[0, 5], [5, 10], [10, 15], [15, 20], [20, 24]]
    data = LatentSet.load(encoded["lat"])
    assert torch.equal(data.prompt_index[:12], data.prompt_index[12:])
    z = data.latents.to_tensor()
    assert not torch.allclose(z[:12], z[12:], atol=1e-3)  # flips are other latents ...
    from llcm.vae import load_vae, scan_split, load_pixels, to_model_range

    vae = load_vae(encoded["tmp"] / "vae0")
    x = to_model_range(load_pixels(scan_split(encoded["data"], "train", 4), [11]))
    with torch.no_grad():  # ... of the same images: row 12 + i is image i flipped (across a shard boundary)
        flipped = vae.encode(torch.flip(x, dims=[-1])).latent_dist.mean * vae.config.scaling_factor
    assert torch.allclose(z[23], flipped[0], rtol=2 ** -10, atol=1e-4)


@pytest.mark.parametrize("how", ["missing", "cut", "changed", "other VAE"])
def test_encode_names_a_broken_shard_and_overwrite_rebuilds_it(encoded, how, tmp_path, capsys):
    out = tmp_path / "lat"
    shutil.copytree(encoded["lat"], out)
    if how == "other VAE":  # the same images encoded by another VAE: its shard 1 copied in
        assert main([*encoded["argv"], "--model", str(encoded["tmp"] / "vae1"), "--out", str(tmp_path / "o")]) == 0
        shutil.copy(tmp_path / "o" / "latents-00001.safetensors", out / "latents-00001.safetensors")
        words = "made by VAE"
    else:
        words = damage(out, how, tmp_path)
    capsys.readouterr()
    assert main([*encoded["argv"], "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert words in line and "latents-00001.safetensors" in line and "--overwrite" in line
    assert main([*encoded["argv"], "--out", str(out), "--overwrite"]) == 0
    assert files(out) == files(encoded["lat"])


def test_training_refuses_a_cache_with_a_missing_shard(encoded, tmp_path, capsys):
    lat = tmp_path / "lat"
    shutil.copytree(encoded["lat"], lat)
    (lat / "latents-00003.safetensors").unlink()
    capsys.readouterr()
    assert main(["train", "teacher", "--latents", str(lat), "--model", str(encoded["tmp"] / "vae0"), "--out",
                 str(tmp_path / "run"), "--steps", "1", "--batch", "4", "--quiet"]) == 2
    assert "latents-00003.safetensors is missing" in one_error_line(capsys) and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ processes

def test_two_simulated_ranks_write_the_cache_of_one(encoded, tmp_path):
    """The per-rank split and the main process's merge, in one process: rank 1's shards, then rank 0's."""
    from llcm.encode import encode_shards, finish_encode, plan_encode, prepare_out

    job = plan_encode(encoded["data"], encoded["tmp"] / "vae0", tmp_path / "lat", flip=True, batch_size=3,
                      shard_mb=rows_mb(5))
    prepare_out(job, overwrite=False)
    assert encode_shards(job, rank=1, world=2) == [2, 3, 4]  # a contiguous run of shards, so of images
    assert encode_shards(job, rank=0, world=2) == [0, 1]
    finish_encode(job)
    assert files(tmp_path / "lat") == files(encoded["lat"])


def test_two_processes_write_the_cache_of_one(encoded, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)]),
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "-m", "llcm.cli", *encoded["argv"], "--out", str(tmp_path / "lat")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("encoded 24 latents") == 1  # the main process reports
    assert files(tmp_path / "lat") == files(encoded["lat"])
    # again: the cache is up to date; then with a damaged shard every process stops with the same line
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "llcm.cli",
            *encoded["argv"], "--out", str(tmp_path / "lat")]
    res = subprocess.run(argv[:5] + ["--master_port", str(_free_port())] + argv[5:], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.count("is up to date") == 1, res.stderr[-3000:]
    shard = tmp_path / "lat" / "latents-00004.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    res = subprocess.run(argv[:5] + ["--master_port", str(_free_port())] + argv[5:], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode != 0 and res.stderr.count("latents-00004.safetensors is damaged") == 2, res.stderr[-3000:]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_interrupted_encode_keeps_its_finished_shards(encoded, tmp_path, capsys):
    from llcm.encode import encode_split

    out = tmp_path / "lat"
    shutil.copytree(encoded["lat"], out)
    (out / "latents.json").unlink()  # as if stopped before the end: shards 0, 2, 4 done
    for i in (1, 3):
        (out / f"latents-0000{i}.safetensors").unlink()
    _, info = encode_split(encoded["data"], encoded["tmp"] / "vae0", out, flip=True, batch_size=3,
                           shard_mb=rows_mb(5), progress=False)
    assert info["written"] == 2 and files(out) == files(encoded["lat"])
    # another --dtype is another cache: refused, then replaced with --overwrite
    capsys.readouterr()
    assert main([*encoded["argv"], "--out", str(out), "--dtype", "fp32"]) == 2
    assert "dtype 'float16' != 'float32'" in one_error_line(capsys)
    assert main([*encoded["argv"], "--out", str(out), "--dtype", "fp32", "--overwrite"]) == 0
    assert json.loads((out / "latents.json").read_text())["dtype"] == "float32"
    capsys.readouterr()
    assert main([*encoded["argv"], "--out", str(out), "--dtype", "fp32"]) == 0
    assert "up to date" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ training

def test_training_on_shards_matches_the_same_latents_in_memory(tmp_path):
    from train_worker import micro_components, micro_data

    from llcm.tasks import TeacherTask
    from llcm.training import TrainConfig, train

    micro_data().save(tmp_path / "c", dtype="fp16", shard_mb=rows_mb(8))  # 64 latents in 8 shards
    sharded = LatentSet.load(tmp_path / "c")
    whole = LatentSet(sharded.latents.to_tensor(), sharded.prompt_index, sharded.prompts, sharded.meta)
    runs = {}
    for name, data in (("sharded", sharded), ("whole", whole)):
        cfg = TrainConfig(out=str(tmp_path / name), max_steps=2, batch_size=8, lr=1e-3, log_every=1,
                          checkpoint_every=1000, progress=False)
        train(TeacherTask(micro_components(), data), cfg)
        runs[name] = [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert len(runs["sharded"]) == 2 and runs["sharded"] == runs["whole"]
    a, b = (json.loads((tmp_path / n / "model" / "llcm.json").read_text()) for n in ("sharded", "whole"))
    assert a["latent_mean"] == b["latent_mean"]


def test_each_rank_reads_only_its_rows_of_the_global_batch(tmp_path, tiny_student, monkeypatch):
    """Teacher and LCF-with-replay draws: every random number is the global batch's, and a rank's slice equals the
    slice of the full draw, but only the rank's rows (new data and replay) are read."""
    import copy
    import dataclasses

    from train_worker import micro_components, micro_data

    from llcm.tasks import FinetuneTask, TeacherTask
    from llcm.training import batch_indices, slice_batch, step_generator

    micro_data().save(tmp_path / "c", dtype="fp16", shard_mb=rows_mb(8))
    small(6).save(tmp_path / "r", dtype="fp16", shard_mb=rows_mb(2))
    data, replay = LatentSet.load(tmp_path / "c"), LatentSet.load(tmp_path / "r")
    read = []
    real = ShardedLatents.rows
    monkeypatch.setattr(ShardedLatents, "rows", lambda self, index: read.append((self, index.tolist()))
                        or real(self, index))
    tasks = {"teacher": TeacherTask(micro_components(), data),
             "lcf": FinetuneTask(dataclasses.replace(tiny_student, unet=copy.deepcopy(tiny_student.unet)), data,
                                 k=100, w_min=1.0, w_max=3.0, replay=replay, replay_fraction=0.5)}
    for name, task in tasks.items():
        idx = batch_indices(len(data), 8, 3, 0)
        full = task.draw(idx, step_generator(0, 3))
        replayed_rows = 0
        for rank in (0, 1):
            read.clear()
            task.local_rows = slice(4 * rank, 4 * rank + 4)
            part = task.draw(idx, step_generator(0, 3))
            task.local_rows = slice(None)
            mine = slice_batch(part, 4 * rank, 4 * rank + 4)
            assert all(torch.equal(mine[k], v) for k, v in slice_batch(full, 4 * rank, 4 * rank + 4).items()), name
            new = [i for lat, rows in read if lat is data.latents for i in rows]
            assert new == idx[4 * rank:4 * rank + 4].tolist(), name
            if name == "lcf":
                replayed = [i for lat, rows in read if lat is replay.latents for i in rows]
                assert len(replayed) == int(mine["replay"].sum()), (rank, replayed)
                replayed_rows += len(replayed)
        assert name == "teacher" or replayed_rows == int(full["replay"].sum()) == 4
