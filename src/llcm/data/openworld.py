"""An open-world image corpus from pixels that ship inside installed packages, for a VAE that must
reconstruct medical images of kinds it never saw, and for adaptation (LCF) experiments on them.

Every source is named by its *modality*, so that an experiment can leave whole modalities out of
training and measure on them (``bench/vae_open_world.py``). Three modalities are held out of the
default model's VAE and serve as the unseen data of the adaptation experiments:

| modality | pixels | held out by default |
|---|---|---|
| ultrasound | pydicom's test files: a 30-frame cardiac cine and three stills | yes |
| microscopy | scikit-image's ``cell`` (a light-microscopy image) | yes |
| nuclear-medicine | pydicom's ``JPEG2000.dcm`` (a 1024 x 256 whole-body scintigram) | yes |
| mri | nilearn's MNI152 2009a T1 (3 planes), pydicom's and nibabel's MR files | no |
| ct | pydicom's CT files, each in several windows (brain, soft tissue, bone, lung) | no |
| fundus | scikit-image's ``retina`` and ``microaneurysms`` | no |
| histology | scikit-image's ``immunohistochemistry`` | no |
| natural | scikit-image's photographs (astronaut, camera, coffee, coins, rocket, moon, ...) | no |
| procedural | shapes, Shepp-Logan phantom, smooth and grainy noise fields, gratings | no |

Crops: a random square of log-uniform side (from 3/4 of the output size up to the short side of its
region), resized to ``size`` with antialiasing; training crops also get a random gamma, contrast,
flip / quarter turn and, for colour sources, desaturation. Train and test never share pixels: the
last fifth of a cine's frames, and two of eight bands across a still image, are test (`regions`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from llcm.errors import UserError


@dataclass(frozen=True)
class Modality:
    name: str
    prompt: str
    load: Callable[[], list[np.ndarray]]  # frames: float32 [H, W] or [H, W, 3] in [0, 1]
    held_out: bool
    licence: str


def _unit(a: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    a = a.astype(np.float32)
    lo = float(a.min()) if lo is None else lo
    hi = float(a.max()) if hi is None else hi
    return np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)


def _dicom(name: str):
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        raise UserError(f"pydicom does not ship the test file {name} in this version")
    return pydicom.dcmread(path)


def _ultrasound() -> list[list[np.ndarray]]:
    from pydicom.pixels import apply_color_lut

    cine = _dicom("examples_ybr_color.dcm").pixel_array  # [30, 240, 320, 3], converted to RGB by pydicom
    stills = [_dicom("examples_rgb_color.dcm").pixel_array, _dicom("examples_jpeg2k.dcm").pixel_array]
    pal = _dicom("examples_palette.dcm")
    stills.append(apply_color_lut(pal.pixel_array, pal)[..., :3] / 256.0)
    out = [[_unit(f, 0, 255) for f in cine]]
    out += [[_unit(s, 0, 255)] for s in stills[:2]] + [[_unit(stills[2], 0, 255)]]
    return out


def _microscopy() -> list[list[np.ndarray]]:
    from skimage import data

    return [[_unit(data.cell(), 0, 255)]]


def _nuclear() -> list[list[np.ndarray]]:
    scan = _dicom("JPEG2000.dcm").pixel_array.astype(np.float32)
    return [[_unit(scan, 0, float(np.percentile(scan, 99.5)))]]  # the bladder would leave the skeleton dark


def _mri() -> list[list[np.ndarray]]:
    import nibabel as nib

    from llcm.data.mini import _mni_raw

    t1 = _mni_raw()["t1"]
    frames = []
    for axis in range(3):
        n = t1.shape[axis]
        frames.append([np.rot90(np.take(t1, i, axis=axis)).copy() for i in range(n // 5, 4 * n // 5, 6)])
    frames.append([_unit(_dicom("examples_overlay.dcm").pixel_array)])
    frames.append([_unit(_dicom("MR_small.dcm").pixel_array)])
    epi = np.asarray(nib.load(Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz").dataobj)[..., 0]
    frames.append([np.rot90(_unit(epi[:, :, i], 0, float(epi.max()))).copy() for i in range(2, 22, 2)])
    return frames


def _ct() -> list[list[np.ndarray]]:
    windows = [(40, 80), (50, 400), (400, 1800), (-600, 1500)]  # (level, width) HU: brain, soft tissue, bone, lung
    out = []
    for name in ("CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "693_J2KI.dcm"):
        ds = _dicom(name)
        hu = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) + float(
            getattr(ds, "RescaleIntercept", 0))
        out.append([_unit(hu, c - w / 2, c + w / 2) for c, w in windows])
    return out


def _fundus() -> list[list[np.ndarray]]:
    from skimage import data

    return [[_unit(data.retina(), 0, 255)], [_unit(data.microaneurysms(), 0, 255)]]


def _histology() -> list[list[np.ndarray]]:
    from skimage import data

    return [[_unit(data.immunohistochemistry(), 0, 255)]]


def _natural() -> list[list[np.ndarray]]:
    from skimage import data

    names = ("astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "moon", "horse", "brick", "grass",
             "gravel", "hubble_deep_field", "motorcycle_left", "text", "page", "clock", "logo", "colorwheel")
    out = []
    for n in names:
        fn = getattr(data, n, None)
        if fn is None:
            continue
        img = np.asarray(fn())
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.ndim == 3 and img.shape[2] == 4:
            img = img[..., :3]
        out.append([_unit(img, 0, 255 if img.dtype == np.uint8 else None)])
    return out


def _procedural(seed: int = 1234, count: int = 48, size: int = 256) -> list[list[np.ndarray]]:
    """Shapes, the Shepp-Logan phantom, smooth and grainy noise fields and gratings (generic content)."""
    from scipy.ndimage import gaussian_filter
    from skimage import data

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    frames = [_unit(data.shepp_logan_phantom())]
    for i in range(count):
        kind = i % 4
        if kind == 0:  # ellipses and rectangles of random grey levels, softly blurred
            img = np.full((size, size), rng.uniform(0, 0.4), np.float32)
            for _ in range(rng.integers(3, 12)):
                cx, cy, rx, ry = rng.uniform(0, 1, 2).tolist() + rng.uniform(0.03, 0.3, 2).tolist()
                mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1 if rng.random() < 0.6 else (
                    (abs(xx - cx) < rx) & (abs(yy - cy) < ry))
                img[mask] = rng.uniform(0, 1)
            img = gaussian_filter(img, rng.uniform(0, 2))
        elif kind == 1:  # smooth random field
            img = gaussian_filter(rng.standard_normal((size, size)), rng.uniform(2, 24))
        elif kind == 2:  # grainy field: smooth base times multiplicative grain
            base = gaussian_filter(rng.standard_normal((size, size)), rng.uniform(8, 32))
            grain = gaussian_filter(rng.standard_normal((size, size)), rng.uniform(0.5, 1.5))
            img = _unit(base) * (1 + rng.uniform(0.2, 0.8) * grain)
        else:  # grating of random orientation and frequency
            a, f = rng.uniform(0, np.pi), rng.uniform(2, 30)
            img = np.sin(2 * np.pi * f * (np.cos(a) * xx + np.sin(a) * yy)) * rng.uniform(0.3, 1)
            img = img + gaussian_filter(rng.standard_normal((size, size)), 3) * 0.5
        img = _unit(img)
        if rng.random() < 0.3:  # a colour version
            tint = rng.uniform(0.3, 1, 3).astype(np.float32)
            img = np.clip(img[..., None] * tint + rng.uniform(0, 0.3, 3), 0, 1).astype(np.float32)
        frames.append(img)
    return [[f] for f in frames]


_PKG = "pixels shipped with {}: see that package's licence and data notices"
MODALITIES: dict[str, Modality] = {m.name: m for m in [
    Modality("ultrasound", "echocardiography ultrasound image", _ultrasound, True, _PKG.format("pydicom (test files)")),
    Modality("microscopy", "light microscopy of cells", _microscopy, True, _PKG.format("scikit-image")),
    Modality("nuclear-medicine", "whole-body bone scintigraphy, nuclear medicine", _nuclear, True,
             _PKG.format("pydicom (test files)")),
    Modality("mri", "brain MRI", _mri, False, _PKG.format("nilearn (MNI152 2009a), pydicom, nibabel")),
    Modality("ct", "CT slice", _ct, False, _PKG.format("pydicom (test files)")),
    Modality("fundus", "retinal fundus photograph", _fundus, False, _PKG.format("scikit-image")),
    Modality("histology", "histopathology, immunohistochemistry", _histology, False, _PKG.format("scikit-image")),
    Modality("natural", "photograph", _natural, False, _PKG.format("scikit-image")),
    Modality("procedural", "procedural texture", _procedural, False, "generated by llcm (Apache-2.0)"),
]}
HELD_OUT = tuple(m.name for m in MODALITIES.values() if m.held_out)


def check_modalities(names) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in MODALITIES]
    if unknown:
        raise UserError(f"unknown modality {', '.join(unknown)}; choose from {', '.join(MODALITIES)}")
    return names


def regions(modality: str, split: str) -> list[np.ndarray]:
    """The pieces of pixels a split may crop from. Per source: a cine's first 4/5 of frames (train) or
    last 1/5 (test); a still image of 256 px or more along its longer side is cut across that side into
    8 bands, bands 3 and 7 test and the others train, each band a piece (test crops then come from the
    same anatomy at the same scales as train crops); a smaller still is cut 3/4 train, 1/4 test."""
    if split not in ("train", "test"):
        raise UserError(f"split must be train or test, got {split!r}")
    out = []
    for frames in MODALITIES[modality].load():
        if len(frames) >= 5:
            cut = len(frames) * 4 // 5
            out += frames[:cut] if split == "train" else frames[cut:]
            continue
        for f in frames:
            axis = 0 if f.shape[0] > f.shape[1] else 1
            n = f.shape[axis]
            if n >= 256:
                edges = [n * i // 8 for i in range(9)]
                bands = [(edges[i], edges[i + 1]) for i in range(8) if (i in (2, 6)) == (split == "test")]
            else:
                bands = [(0, n * 3 // 4)] if split == "train" else [(n * 3 // 4, n)]
            out += [f[a:b] if axis == 0 else f[:, a:b] for a, b in bands]
    return out


def _to_rgb(f: np.ndarray) -> np.ndarray:
    return np.repeat(f[..., None], 3, axis=2) if f.ndim == 2 else f


def random_crops(frames: list[np.ndarray], n: int, size: int, rng: np.random.Generator,
                 augment: bool = False, min_std: float = 0.02, colour_jitter: bool = False) -> np.ndarray:
    """``n`` crops, uint8 [n, size, size, 3]; a frame is picked in proportion to its area. Crops whose
    grey-level std is under ``min_std`` (blank background) are redrawn, up to 20 times."""
    from PIL import Image

    areas = np.array([f.shape[0] * f.shape[1] for f in frames], dtype=np.float64)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        for _ in range(20):
            f = frames[rng.choice(len(frames), p=areas / areas.sum())]
            h, w = f.shape[:2]
            short = min(h, w)
            lo = min(short, 0.75 * size)
            side = int(round(np.exp(rng.uniform(np.log(lo), np.log(short)))))
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = _to_rgb(f[y:y + side, x:x + side])
            if crop.std() >= min_std:
                break
        img = Image.fromarray((crop * 255).round().astype(np.uint8)).resize((size, size), Image.Resampling.LANCZOS)
        arr = np.asarray(img).astype(np.float32) / 255
        if augment:
            arr = _augment(arr, rng, colour_jitter)
        out[i] = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    return out


def hue_saturation(arr: np.ndarray, angle: float, saturation: float) -> np.ndarray:
    """Rotate the colours of float RGB [H, W, 3] about the grey axis by ``angle`` radians and scale their
    distance from it by ``saturation``; grey pixels are unchanged."""
    grey = arr.mean(2, keepdims=True)
    u = np.array([1.0, -1.0, 0.0]) / np.sqrt(2)  # two orthonormal axes of the plane across the grey axis
    v = np.array([1.0, 1.0, -2.0]) / np.sqrt(6)
    chroma = arr - grey
    a, b = chroma @ u, chroma @ v
    c, s = np.cos(angle), np.sin(angle)
    a, b = saturation * (c * a - s * b), saturation * (s * a + c * b)
    return grey + a[..., None] * u + b[..., None] * v


def _augment(arr: np.ndarray, rng: np.random.Generator, colour_jitter: bool = False) -> np.ndarray:
    if colour_jitter and rng.random() < 0.5:  # any hue, so colours no source has (fundus orange) are seen
        arr = np.clip(hue_saturation(arr, rng.uniform(-np.pi, np.pi), rng.uniform(0.6, 1.6)), 0, 1)
    arr = arr ** np.exp(rng.uniform(-0.4, 0.4))  # gamma 0.67-1.49
    mean = arr.mean()
    arr = (arr - mean) * rng.uniform(0.7, 1.3) + mean + rng.uniform(-0.1, 0.1)
    if rng.random() < 0.25:  # desaturate (no-op for grey sources)
        arr = np.repeat(arr.mean(2, keepdims=True), 3, axis=2)
    arr = np.rot90(arr, rng.integers(0, 4))
    return arr[:, ::-1] if rng.random() < 0.5 else arr


def corpus(modalities, per_modality: int, size: int = 64, seed: int = 0, split: str = "train",
           augment: bool | None = None, colour_jitter: bool = False) -> tuple[np.ndarray, list[str]]:
    """uint8 [N, size, size, 3] crops of each modality and their modality names (``augment`` defaults to
    True for train, False for test; ``colour_jitter`` adds random hue rotations and saturation to it)."""
    names = check_modalities(modalities)
    augment = split == "train" if augment is None else augment
    images, labels = [], []
    for name in names:  # seeded by name: leaving a modality out does not change the others' crops
        rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 0 if split == "train" else 1])
        images.append(random_crops(regions(name, split), per_modality, size, rng, augment=augment,
                                   colour_jitter=colour_jitter))
        labels += [name] * per_modality
    return np.concatenate(images), labels


def write_dataset(out: str | Path, modalities, train_per_modality: int, test_per_modality: int,
                  size: int = 64, seed: int = 0, augment: bool = True, progress: bool = False) -> Path:
    """An imagefolder dataset (``out/{train,test}/<modality>/NNNNN.png`` + ``metadata.jsonl`` rows with
    ``file_name``, ``text`` = the modality's prompt, ``class``, ``modality``, ``source``, ``licence``), the
    layout `llcm train vae`, `llcm encode` and `llcm evaluate` read. Train crops are augmented unless
    ``augment`` is False (a dataset to adapt a model to should look like its test images); test crops
    come from pixels no train crop saw. Written beside ``out`` and renamed into place."""
    import json

    from PIL import Image
    from tqdm.auto import tqdm

    from llcm.fileio import atomic_folder

    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new folder (nothing was written)")
    names = check_modalities(modalities)
    if not names:
        raise UserError("no modality left to write")
    with atomic_folder(out) as tmp:
        for split, n in (("train", train_per_modality), ("test", test_per_modality)):
            rows = []
            for name in tqdm(names, desc=f"openworld {split}", disable=not progress, dynamic_ncols=True):
                imgs, _ = corpus([name], n, size, seed, split, augment=augment and split == "train")
                (tmp / split / name).mkdir(parents=True, exist_ok=True)
                m = MODALITIES[name]
                for i, img in enumerate(imgs):
                    rel = f"{name}/{i:05d}.png"
                    Image.fromarray(img).save(tmp / split / rel)
                    rows.append({"file_name": rel, "text": m.prompt, "class": name, "modality": name,
                                 "source": "llcm.data.openworld", "licence": m.licence})
            if rows:
                (tmp / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out
