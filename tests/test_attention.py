"""llcm.attention: a batch of one prompt attends to it once, with the same floats."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from llcm.attention import SharedPromptAttnProcessor


def test_shared_prompt_attention_gives_the_same_floats_and_takes_its_path(monkeypatch, one_torch_thread):
    from llcm.pipeline import load_pipeline
    from torch.nn import functional as F

    pipe = load_pipeline("default")
    real_sdpa = F.scaled_dot_product_attention
    folded = []

    def spy(q, k, v, *args, **kwargs):
        if q.shape[0] == 1 and q.shape[2] != k.shape[2]:  # cross-attention with the batch folded in
            folded.append(tuple(q.shape))
        return real_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    prompt = "retinal fundus photograph, normal"
    shared = pipe([prompt] * 6, steps=2, seeds=list(range(6))).images
    assert folded and all(shape[2] % 6 == 0 for shape in folded)  # 6 images' queries in one call
    assert (1, 4, 6 * 16 * 16, 8) in folded
    pipe.components.unet.set_attn_processor(AttnProcessor2_0())  # diffusers' own processor
    folded.clear()
    plain = pipe([prompt] * 6, steps=2, seeds=list(range(6))).images
    assert not folded and np.array_equal(shared, plain)


def test_several_prompts_and_self_attention_take_diffusers_path(tiny_student, monkeypatch):
    from torch.nn import functional as F

    unet = tiny_student.unet
    unet.set_attn_processor(SharedPromptAttnProcessor())
    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, *a, **kw: calls.append(q.shape[0]) or real_sdpa(q, k, v, *a, **kw))
    g = torch.Generator().manual_seed(0)
    z = torch.randn((3, unet.config.in_channels, 8, 8), generator=g)
    two = torch.randn((2, 7, unet.config.cross_attention_dim), generator=g)
    embeds = two[[0, 1, 0]]  # a copy, not one row expanded: nothing is shared
    cond = torch.zeros((3, unet.config.time_cond_proj_dim))
    with torch.no_grad():
        out = unet(z, torch.tensor([5, 5, 5]), encoder_hidden_states=embeds, timestep_cond=cond).sample
        unet.set_attn_processor(AttnProcessor2_0())
        ref = unet(z, torch.tensor([5, 5, 5]), encoder_hidden_states=embeds, timestep_cond=cond).sample
    assert set(calls) == {3} and torch.equal(out, ref)
