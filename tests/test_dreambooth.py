"""DreamBooth baseline: it learns (loss falls), its batches are deterministic, the prior term is part of the
loss, and `llcm train dreambooth` + `llcm evaluate` sample each class with its own model and instance prompt."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from llcm.cli import main
from llcm.dreambooth import DreamBoothTask, read_set
from llcm.training import TrainConfig, step_generator, train
from train_worker import PROMPTS, micro_components, micro_data


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _task(**kw) -> DreamBoothTask:
    return DreamBoothTask(micro_components(0), micro_data(), "left blob", num_prior=8, prior_steps=3, prior_w=1.0,
                          **kw)


def test_dreambooth_trains_and_saves_a_teacher_folder(tmp_path):
    task = _task()
    assert task.instance_prompt == "sks left blob" and task.prior_prompt == "left blob"
    assert task.num_examples() == 16 and task.prior_latents.shape == (8, 4, 8, 8)
    fixed = task.draw(torch.arange(16), step_generator(123, 0))  # a held-fixed batch: the loss before and after

    def fixed_loss() -> float:
        net = task.trainable
        was = net.training
        net.eval()
        with torch.no_grad():
            value = float(task.loss(net, fixed).mean())
        net.train(was)
        return value

    before = fixed_loss()
    cfg = TrainConfig(out=str(tmp_path), max_steps=60, batch_size=16, lr=2e-3, log_every=5, checkpoint_every=1000,
                      progress=False)
    assert train(task, cfg)["status"] == "finished"
    ls = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(ls[-3:]) / 3 < 0.8 * sum(ls[:2]) / 2, ls
    assert fixed_loss() < 0.8 * before, (fixed_loss(), before)
    meta = json.loads((tmp_path / "model" / "llcm.json").read_text())
    assert meta["source"]["task"] == "dreambooth" and meta["source"]["instance_prompt"] == "sks left blob"
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"


def test_draws_are_deterministic_and_the_prior_term_counts():
    task = _task(cond_dropout=0.0)
    idx = torch.arange(4)
    a, b = task.draw(idx, step_generator(0, 3)), task.draw(idx, step_generator(0, 3))
    assert set(a) == {"z0", "noise", "t", "embeds", "prior_z0", "prior_noise", "prior_t", "prior_embeds"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    net = task.trainable.eval()
    with torch.no_grad():
        full = task.loss(net, a)
        inst = task.loss_fn(net, a)
        task.prior_weight = 0.0
        assert torch.allclose(task.loss(net, a), inst)
    assert bool((full > inst).all())


def test_cli_trains_a_set_and_evaluate_uses_it(tmp_path, capsys):
    from llcm.pipeline import LLCMConfig, save_model_folder
    from llcm.schedules import Schedule
    from test_evaluate import make_dataset

    teacher = tmp_path / "teacher"
    save_model_folder(micro_components(0), Schedule.scaled_linear(), LLCMConfig(), teacher,
                      pipeline_class="StableDiffusionPipeline")
    micro_data().save(tmp_path / "lat")
    out = tmp_path / "db"
    rc = main(["train", "dreambooth", "--teacher", str(teacher), "--latents", str(tmp_path / "lat"),
               "--class", "left blob,top bar", "--out", str(out), "--steps", "3", "--batch", "4",
               "--num-prior", "4", "--prior-steps", "2", "--checkpoint-every", "100"])
    assert rc == 0
    index = read_set(out)["classes"]
    assert sorted(index) == ["left blob", "top bar"] and index["top bar"]["prompt"] == "sks top bar"
    # a second run skips the finished classes
    assert main(["train", "dreambooth", "--teacher", str(teacher), "--latents", str(tmp_path / "lat"),
                 "--class", "left blob", "--out", str(out), "--steps", "3", "--batch", "4"]) == 0
    assert "already trained" in capsys.readouterr().out
    data = make_dataset(tmp_path / "data", n_train=4, n_test=4)
    ev = tmp_path / "eval"
    rc = main(["evaluate", "--data", str(data), "--out", str(ev), "--extractor", "filterbank", "--per-class", "2",
               "--classes", "left-blob,top-bar", "--no-memorization", "--quiet", "--model", f"db={out}:ddim@2"])
    assert rc == 0
    results = json.loads((ev / "results.json").read_text())
    assert [r["key"] for r in results["runs"]] == ["db/ddim-2"] and results["runs"][0]["kind"] == "dreambooth"
    with Image.open(next((ev / "images" / "db" / "ddim-2" / "top-bar").glob("*.png"))) as im:
        assert im.text["llcm:prompt"] == "sks top bar"
    assert PROMPTS[0] == "left blob"
    with pytest.raises(SystemExit):
        main(["train", "dreambooth", "--help"])
