"""A deterministic micro training run, used by tests (also launched under torchrun for 2 processes).

python tests/train_worker.py OUT TASK STEPS [--resume] [--pids]

--pids writes OUT/pid-<rank> (the worker's process id, for tests that signal one rank). Every process prints
its summary as one JSON line with its rank; an interrupted run exits with status 0 and "status": "interrupted".
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

MICRO = {
    "name": "micro", "source": "configs", "resolution": 32, "prediction_type": "epsilon",
    "unet": {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 32],
             "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
             "attention_head_dim": 8, "norm_num_groups": 8},
    "vae": {"in_channels": 3, "out_channels": 3, "block_out_channels": [8, 8, 8], "layers_per_block": 1,
            "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
            "latent_channels": 4, "norm_num_groups": 8, "sample_size": 32},
    "text_encoder": {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                     "bos_token_id": 49406, "eos_token_id": 49407},
    "tokenizer": {"model_max_length": 77},
}
PROMPTS = ["left blob", "right blob", "top bar", "bottom bar"]


def micro_data(n: int = 64, seed: int = 0):
    """Class-conditional latents [n, 4, 8, 8]: each class a fixed pattern, each sample one of two modes."""
    from llcm.latents import LatentSet

    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(len(PROMPTS), 4, 8, 8, generator=g)
    modes = torch.randn(len(PROMPTS), 4, 8, 8, generator=g) * 0.8
    cls = torch.arange(n) % len(PROMPTS)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).view(-1, 1, 1, 1)
    lat = protos[cls] + sign * modes[cls] + 0.05 * torch.randn(n, 4, 8, 8, generator=g)
    return LatentSet(lat, cls, list(PROMPTS), {"source": "synthetic micro"})


def micro_components(seed: int = 0):
    from llcm.models import build_tiny_components

    return build_tiny_components(MICRO, seed=seed)


def make_task(kind: str, teacher_dir: str | None = None):
    from llcm.models import load_components
    from llcm.tasks import DistillTask, TeacherTask

    data = micro_data()
    if kind == "teacher":
        return TeacherTask(micro_components(), data)
    return DistillTask(load_components(teacher_dir) if teacher_dir else micro_components(), data,
                       solver="midpoint", k=100, w_min=1.0, w_max=3.0, metric="l2")


def main(argv: list[str]) -> None:
    from llcm.training import TrainConfig, train

    torch.set_num_threads(1)
    out, kind, steps = argv[0], argv[1], int(argv[2])
    resume = "--resume" in argv
    rank = int(os.environ.get("RANK", "0"))
    if "--pids" in argv:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"pid-{rank}").write_text(str(os.getpid()))
    cfg = TrainConfig(out=out, max_steps=steps, batch_size=8, lr=1e-3, checkpoint_every=2, progress=False,
                      keep_checkpoints=10)
    summary = train(make_task(kind), cfg, resume=resume)
    print(json.dumps({"rank": rank, **summary}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
