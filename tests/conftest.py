import dataclasses
import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("LLCM_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny_student():
    """Tiny components (random weights, seed 0) whose UNet has a guidance embedding with non-zero weights."""
    from llcm.models import add_guidance_embedding, build_tiny_components, load_preset

    comps = build_tiny_components(load_preset("tiny-cpu"), seed=0)
    unet = add_guidance_embedding(comps.unet)
    with torch.no_grad():  # make w matter (the embedding starts at zero)
        g = torch.Generator().manual_seed(0)
        proj = unet.time_embedding.cond_proj.weight
        proj.copy_(torch.randn(proj.shape, generator=g) * 0.05)
    return dataclasses.replace(comps, unet=unet)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on a small shared machine, more threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
