"""Training: learning (not just running), bit-identical resume, multi-process equivalence, bad input."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llcm.models import load_components
from llcm.sampling import cfg_denoiser, make_generators, sample_consistency, sample_ode
from llcm.consistency import ConsistencyModel
from llcm.schedules import Schedule
from llcm.tasks import DistillTask, FinetuneTask, TeacherTask, prompt_table
from llcm.training import TrainConfig, train
from train_worker import PROMPTS, micro_components, micro_data

HERE = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)])}


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    cfg = TrainConfig(out=str(out), max_steps=150, batch_size=16, lr=2e-3, log_every=10, checkpoint_every=1000,
                      progress=False)
    train(TeacherTask(micro_components(), micro_data()), cfg)
    return out


@pytest.fixture(scope="module")
def distill_run(teacher_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill")
    task = DistillTask(load_components(teacher_run / "model"), micro_data(), solver="ddim", k=100,
                       w_min=0.0, w_max=1.0, metric="l2", ema_decay=0.9)
    cfg = TrainConfig(out=str(out), max_steps=150, batch_size=16, lr=1e-3, log_every=10, checkpoint_every=1000,
                      progress=False)
    train(task, cfg)
    return out


def test_teacher_loss_falls(teacher_run):
    ls = losses(teacher_run)
    assert sum(ls[-3:]) / 3 < 0.6 * sum(ls[:2]) / 2, ls
    assert (teacher_run / "model" / "model_index.json").exists()
    meta = json.loads((teacher_run / "model" / "llcm.json").read_text())
    assert meta["latent_mean"] == pytest.approx(micro_data().latents.mean((0, 2, 3)).tolist(), abs=1e-5)
    assert list((teacher_run / "samples").glob("*.png"))


def test_distillation_loss_falls(distill_run):
    ls = losses(distill_run)
    assert sum(ls[-3:]) / 3 < 0.5 * sum(ls[:2]) / 2, ls
    meta = json.loads((distill_run / "model" / "llcm.json").read_text())
    assert meta["solver"] == "ddim" and meta["k"] == 100 and meta["classes"] == PROMPTS
    # samples start from the training latents' channel mean (llcm.sampling.initial_latents)
    assert meta["latent_mean"] == pytest.approx(micro_data().latents.mean((0, 2, 3)).tolist(), abs=1e-5)


def _nearest_distance(samples: torch.Tensor, data: torch.Tensor) -> float:
    d = torch.cdist(samples.flatten(1), data.flatten(1))
    return float(d.min(1).values.mean())


def test_distilled_one_step_is_closer_to_data_than_teacher_one_step(teacher_run, distill_run):
    data = micro_data()
    sched = Schedule.scaled_linear()
    teacher = load_components(teacher_run / "model")
    student = load_components(distill_run / "model")
    prompts = [p for p in PROMPTS for _ in range(8)]
    seeds = list(range(len(prompts)))
    emb = prompt_table(teacher, prompts)
    null = prompt_table(teacher, [""]).expand_as(emb)
    shape = tuple(data.latents.shape[1:])
    with torch.no_grad():
        den = cfg_denoiser(teacher.unet, sched, "epsilon", emb, null, 0.5)
        t1 = sample_ode(den, sched, "ddim", make_generators(seeds), shape, [999])
        f = ConsistencyModel(student.unet, sched)
        s1 = sample_consistency(f, prompt_table(student, prompts), 0.5, make_generators(seeds), shape, [999])
    by_class = [data.latents[data.prompt_index == i] for i in range(len(PROMPTS))]
    dist_t = sum(_nearest_distance(t1[i * 8:(i + 1) * 8], by_class[i]) for i in range(len(PROMPTS)))
    dist_s = sum(_nearest_distance(s1[i * 8:(i + 1) * 8], by_class[i]) for i in range(len(PROMPTS)))
    assert dist_s < 0.9 * dist_t, (dist_s, dist_t)


def test_lcf_runs_and_learns(distill_run, tmp_path):
    task = FinetuneTask(load_components(distill_run / "model"), micro_data(seed=5), k=100, w_min=0.0, w_max=1.0,
                        metric="l2")
    cfg = TrainConfig(out=str(tmp_path), max_steps=40, batch_size=16, lr=1e-3, log_every=5, progress=False)
    summary = train(task, cfg)
    assert summary["status"] == "finished" and (tmp_path / "model" / "llcm.json").exists()
    ls = losses(tmp_path)
    assert min(ls[-3:]) < ls[0], ls


def _weights(ck: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ck / "trainable.safetensors"))


def test_resume_after_kill_is_bit_identical(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([sys.executable, str(HERE / "train_worker.py"), str(straight), "distill", "6"], env=ENV,
                   check=True, capture_output=True)
    proc = subprocess.Popen([sys.executable, str(HERE / "train_worker.py"), str(killed), "distill", "6"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((killed / "checkpoints").glob("checkpoint-0000002")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    state = json.loads((sorted((killed / "checkpoints").glob("checkpoint-*"))[-1] / "state.json").read_text())
    assert 2 <= state["step"] < 6, state["step"]
    assert not (killed / "model").exists()
    subprocess.run([sys.executable, str(HERE / "train_worker.py"), str(killed), "distill", "6", "--resume"],
                   env=ENV, check=True, capture_output=True)
    a = _weights(straight / "checkpoints" / "checkpoint-0000006")
    b = _weights(killed / "checkpoints" / "checkpoint-0000006")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ta = _weights_named(straight, "target")
    tb = _weights_named(killed, "target")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def _weights_named(run: Path, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / "checkpoint-0000006" / f"{name}.safetensors"))


def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(HERE / "train_worker.py"), str(one), "distill", "4"], env=ENV, check=True,
                   capture_output=True)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), str(HERE / "train_worker.py"), str(two), "distill", "4"],
                         env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((two / "config.json").read_text())["processes"] == 2
    a = _weights(one / "checkpoints" / "checkpoint-0000004")
    b = _weights(two / "checkpoints" / "checkpoint-0000004")
    a2 = _weights(one / "checkpoints" / "checkpoint-0000002")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float((a[k] - a2[k]).abs().max()) for k in a)
    assert diff < 0.1 * moved, (diff, moved)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_to_one_rank_stops_both_processes_at_the_same_step(tmp_path):
    """A scheduler's SIGTERM may reach only some ranks: here only rank 1 of 2. Both must stop at the same step
    (an agreed decision, else they diverge at the next collective), the main process writes a checkpoint, and
    both exit cleanly (status 0, summary "interrupted"). Before, rank 1 had no handler and died."""
    run, log = tmp_path / "run", tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", str(_free_port()), str(HERE / "train_worker.py"), str(run),
                                 "distill", "100000", "--pids"], env=ENV, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600  # a generous bound for start-up on a busy machine, not a speed check
        while not ((run / "checkpoints" / "checkpoint-0000002").is_dir() and (run / "pid-1").is_file()):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        os.kill(int((run / "pid-1").read_text()), signal.SIGTERM)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            pytest.fail("the processes did not stop within 120 s of SIGTERM to rank 1\n" + log.read_text()[-3000:])
    finally:
        if proc.poll() is None:  # torchrun's workers run in sessions of their own: kill them by pid too
            for pid_file in run.glob("pid-*"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert code == 0, text[-3000:]
    summaries = [json.loads(line[line.index('{"rank"'):]) for line in text.splitlines() if '{"rank"' in line]
    assert sorted(s["rank"] for s in summaries) == [0, 1], text[-3000:]
    assert {s["status"] for s in summaries} == {"interrupted"}, summaries
    step = summaries[0]["step"]
    assert summaries[1]["step"] == step and 2 <= step < 100000, summaries
    assert (run / "checkpoints" / f"checkpoint-{step:07d}" / "trainable.safetensors").is_file()
    assert json.loads((run / "checkpoints" / f"checkpoint-{step:07d}" / "state.json").read_text())["step"] == step
    assert not (run / "model").exists() and not (run / "summary.json").exists()


def test_task_to_moves_every_frozen_helper(teacher_run):
    """On a GPU accelerate moves only the trainable module; the teacher, EMA target, VAE and text
    encoder must follow (task.to). The meta device stands in for the accelerator here."""
    task = DistillTask(load_components(teacher_run / "model"), micro_data(), solver="midpoint", k=100)
    task.to(torch.device("meta"))
    helpers = {"teacher unet": task.loss_fn.teacher, "target": task.target, "vae": task.components.vae,
               "text encoder": task.components.text_encoder}
    for name, module in helpers.items():
        assert {p.device.type for p in module.parameters()} == {"meta"}, name
    assert task.embeds.device.type == "cpu"  # batches are drawn on the CPU, then moved per step


def test_time_limit_ends_early_with_a_model_and_resume_continues(tmp_path):
    cfg = TrainConfig(out=str(tmp_path), max_steps=100000, batch_size=8, lr=1e-3, log_every=1, progress=False,
                      checkpoint_every=100000, time_limit_minutes=0.5 / 60)
    summary = train(TeacherTask(micro_components(), micro_data()), cfg)
    stopped = summary["step"]  # ended by the clock, far before max_steps (no bound on wall time: the machine is shared)
    assert summary["status"] == "finished" and 0 < stopped < 100000
    assert "time limit" in summary["stopped_by"]
    assert (tmp_path / "model" / "llcm.json").exists()
    assert (tmp_path / "checkpoints" / f"checkpoint-{stopped:07d}").is_dir()
    cfg.max_steps, cfg.time_limit_minutes = stopped + 2, 0.0
    again = train(TeacherTask(micro_components(), micro_data()), cfg, resume=True)
    assert again["step"] == stopped + 2 and "stopped_by" not in again


def test_teacher_can_train_its_text_encoder(tmp_path):
    """Prompts "normal" / "nodule" with two latent patterns: with its text encoder trained, the saved teacher's
    x0 prediction from an ambiguous noisy latent follows the prompt (the encoder weights changed and were saved)."""
    from llcm.latents import LatentSet
    from llcm.models import encode_prompts

    prompts = ["normal", "nodule"]
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(2, 4, 8, 8, generator=g)
    cls = torch.arange(64) % 2
    data = LatentSet(protos[cls] + 0.05 * torch.randn(64, 4, 8, 8, generator=g), cls, prompts, {})
    cfg = TrainConfig(out=str(tmp_path), max_steps=300, batch_size=16, lr=2e-3, progress=False,
                      checkpoint_every=10000)
    train(TeacherTask(micro_components(), data, train_text_encoder=True), cfg)
    trained, start = load_components(tmp_path / "model"), micro_components()
    a, b = trained.text_encoder.state_dict(), start.text_encoder.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in b)
    t = torch.full((2,), 700)
    alpha, sigma = (v.float().view(-1, 1, 1, 1) for v in Schedule.scaled_linear().alpha_sigma(t))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)).expand(2, -1, -1, -1)
    z_t = alpha * protos.mean(0, keepdim=True) + sigma * noise  # halfway between the two patterns
    with torch.no_grad():
        eps = trained.unet(z_t, t, encoder_hidden_states=encode_prompts(trained, prompts)).sample
    d = torch.cdist(((z_t - sigma * eps) / alpha).flatten(1), protos.flatten(1))  # [prompt, pattern]
    assert d[0, 0] < d[0, 1] and d[1, 1] < d[1, 0], d
    with pytest.raises(Exception, match="LoRA"):
        TeacherTask(micro_components(), data, train_text_encoder=True, lora_rank=4)


def test_cosine_learning_rate_warms_up_then_falls_to_zero():
    from llcm.errors import UserError
    from llcm.training import TrainConfig, lr_factor

    f = lr_factor(TrainConfig(max_steps=12, warmup_steps=2, lr_schedule="cosine"))
    assert [f(0), f(1)] == [0.5, 1.0]  # linear warm-up
    assert f(7) == pytest.approx(0.5) and f(12) == pytest.approx(0.0)  # half-way down the cosine, then 0
    assert all(f(s) >= f(s + 1) for s in range(1, 12))
    const = lr_factor(TrainConfig(max_steps=12, warmup_steps=2))
    assert [const(0), const(1), const(11)] == [0.5, 1.0, 1.0]
    with pytest.raises(UserError):
        TrainConfig(lr_schedule="linear").validate()
