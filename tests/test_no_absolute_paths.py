"""No saved artefact records an absolute path of the machine that made it: provenance keeps names (and the
hashes that identify the folders), and an artefact that must find another folder again (an adapter's base,
a DreamBooth set's per-class models) records it relative to itself, so the two can be moved together.

One tiny run of every stage (micro VAE and tiny-cpu UNet, 1-2 steps each, one thread), every input given
as an absolute path; then every text file the run wrote is searched for that path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llcm.cli import main
from test_vae_encode import make_dataset, micro_preset

TEXT = (".json", ".jsonl", ".md", ".txt")
QUICK = ["--steps", "1", "--batch", "4", "--quiet"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def text_files(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in TEXT]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Every stage once: train vae (twice: from a preset; from --init with --anchor), encode, train teacher,
    distill, finetune (full, with --replay-latents) and finetune --lora-rank (an adapter), train dreambooth."""
    tmp = tmp_path_factory.mktemp("abs")
    data = make_dataset(tmp / "data", per_class=(4, 2))
    preset = micro_preset(tmp / "micro.json")
    lat, runs = tmp / "lat", tmp / "runs"
    vae, teacher, student = runs / "vae" / "model", runs / "teacher" / "model", runs / "student" / "model"
    # every path absolute, run folders included (config.json "train", state.json and summary.json record names)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        assert main(["train", "vae", "--data", str(data), "--out", str(runs / "vae"), "--preset", str(preset),
                     "--steps", "2", "--batch", "4", "--quiet"]) == 0
        assert main(["train", "vae", "--data", str(data), "--init", str(vae), "--anchor", str(data),
                     "--out", str(runs / "vae2"), *QUICK]) == 0
        assert main(["encode", "--data", str(data), "--model", str(vae), "--out", str(lat), "--quiet"]) == 0
        assert main(["train", "teacher", "--latents", str(lat), "--model", str(vae), "--out", str(runs / "teacher"),
                     *QUICK]) == 0
        assert main(["distill", "--teacher", str(teacher), "--latents", str(lat), "--out", str(runs / "student"),
                     *QUICK]) == 0
        assert main(["finetune", "--model", str(student), "--latents", str(lat), "--out", str(runs / "ft"), *QUICK,
                     "--replay", "0.5", "--replay-latents", str(lat)]) == 0
        assert main(["finetune", "--model", str(student), "--latents", str(lat), "--out", str(runs / "adapter"), *QUICK,
                     "--lora-rank", "2", "--replay", "0"]) == 0
        assert main(["train", "dreambooth", "--teacher", str(teacher), "--latents", str(lat), "--class", "disk",
                     "--num-prior", "2", "--prior-steps", "2", "--out", str(runs / "db"), "--steps", "1", "--batch", "2",
                     "--quiet"]) == 0
    return {"tmp": tmp, "runs": runs, "teacher": teacher, "student": student, "adapter": runs / "adapter" / "model",
            "db": runs / "db", "lat": lat}


def test_no_saved_file_records_an_absolute_path_of_the_run(run):
    tmp = run["tmp"]
    files = text_files(tmp)
    assert {"llcm.json", "latents.json", "config.json", "vae_report.json", "dreambooth.json"} <= {p.name for p in files}
    leaks = [str(p.relative_to(tmp)) for p in files
             if str(tmp) in p.read_text() or str(tmp.resolve()) in p.read_text()]
    assert leaks == []
    # provenance keeps names and the hashes that identify them
    meta = json.loads((run["lat"] / "latents.json").read_text())
    assert meta["source"] == "data" and meta["vae_source"] == "model" and meta["data_hash"]
    source = json.loads((run["runs"] / "ft" / "model" / "llcm.json").read_text())["source"]
    assert source["data"] == "data" and source["data_hash"] == meta["data_hash"]
    assert source["replay"]["origin"] == "lat" and source["replay"]["data_hash"] == meta["data_hash"]


def test_an_adapter_and_a_dreambooth_set_moved_with_their_base_find_it_again(run, tmp_path):
    from llcm.adapter import adapter_record, base_folder
    from llcm.dreambooth import read_set
    from llcm.models import model_hash
    from llcm.pipeline import LLCMPipeline, load_pipeline

    record = json.loads((run["adapter"] / "llcm.json").read_text())["adapter"]
    assert record["base"] == os.path.join("..", "..", "student", "model")
    moved = tmp_path / "elsewhere" / "runs"
    shutil.copytree(run["runs"], moved)
    adapter, student = moved / "adapter" / "model", moved / "student" / "model"
    assert base_folder(adapter) == student.resolve()  # the moved copy's base, not the original one
    assert adapter_record(adapter)["base"] == str(student.resolve())
    pipe = LLCMPipeline.from_pretrained(adapter)
    assert pipe.model_hash == json.loads((adapter / "llcm.json").read_text())["unet_hash"]
    assert load_pipeline(None, adapter=str(adapter)).model_hash == pipe.model_hash
    (entry,) = read_set(moved / "db")["classes"].values()
    assert Path(entry["model"]) == (moved / "db" / "disk" / "model").resolve()
    index = json.loads((moved / "db" / "dreambooth.json").read_text())
    assert index["teacher"] == "model" and index["teacher_hash"] == model_hash(run["teacher"])
    index["classes"]["disk"]["model"] = str(run["db"] / "disk" / "model")  # an older set: absolute, kept as it is
    (moved / "db" / "dreambooth.json").write_text(json.dumps(index))
    assert read_set(moved / "db")["classes"]["disk"]["model"] == str((run["db"] / "disk" / "model").resolve())
    # an adapter written before records were relative (an absolute base) still loads
    old = tmp_path / "old-adapter"
    shutil.copytree(run["adapter"], old)
    meta = json.loads((old / "llcm.json").read_text())
    meta["adapter"]["base"] = str(student.resolve())
    (old / "llcm.json").write_text(json.dumps(meta))
    assert base_folder(old) == student.resolve()
    assert model_hash(LLCMPipeline.from_pretrained(old).components) == pipe.model_hash


def test_a_latent_cache_that_recorded_a_path_gives_models_its_name_and_hash():
    from llcm.latents import LatentSet
    from llcm.tasks import data_source

    old = LatentSet(torch.zeros(1, 4, 8, 8), torch.zeros(1, dtype=torch.long), ["x"],
                    {"source": "/somewhere/on/the/old/machine/data", "data_hash": "0123"})
    assert data_source("distill", old) == {"task": "distill", "data": "data", "data_hash": "0123"}


def test_teacher_and_dreambooth_folders_hold_no_consistency_settings(run):
    from diffusers import DDIMScheduler

    from llcm.evaluation.evaluate import TeacherSampler

    lcm_only = {"k", "w_min", "w_max", "w_default", "solver", "sigma_data", "timestep_scaling"}
    for folder in (run["teacher"], run["db"] / "disk" / "model"):
        meta = json.loads((folder / "llcm.json").read_text())
        assert not lcm_only & set(meta), folder
        assert {"classes", "latent_mean", "source", "unet_hash", "llcm_version"} <= set(meta)
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert sched["_class_name"] == "DDIMScheduler"
        assert not {"original_inference_steps", "timestep_scaling"} & set(sched)
        DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
        sampler = TeacherSampler(str(folder), "ddim", torch.device("cpu"))
        assert sampler.latent_mean == meta["latent_mean"]
        with torch.no_grad():
            images = sampler.generate(None, ["a bright disk"], [0], 2, None, 1.0)
        assert images.shape[0] == 1 and np.isfinite(images).all()
    # a consistency model keeps them
    meta = json.loads((run["student"] / "llcm.json").read_text())
    assert lcm_only <= set(meta)
    sched = json.loads((run["student"] / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "LCMScheduler" and sched["original_inference_steps"] == 1000 // meta["k"]


ABSOLUTE = re.compile(r"""(^|[\s"'`(=])(/(tmp|home|root|work|Users|usr|opt|var|mnt|srv|data)/|[A-Za-z]:\\)""")


def test_the_shipped_default_model_records_no_absolute_path():
    from llcm.pipeline import default_model_path

    folder = default_model_path()
    assert folder is not None
    files = text_files(folder)
    assert {"llcm.json", "card.json", "README.md"} <= {p.name for p in files}
    assert [str(p.relative_to(folder)) for p in files if ABSOLUTE.search(p.read_text())] == []
