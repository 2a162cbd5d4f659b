"""A small diffusers AutoencoderKL trained on a dataset's images, and the image-folder reading it needs.

What lives here:

* :func:`scan_split` / :func:`load_pixels`: the rows of an HF imagefolder split (``DIR/<split>/
  metadata.jsonl`` with ``file_name`` relative to the split folder, ``text``, ``class``; what
  ``llcm data build`` writes) checked once (every file readable, one image size, a multiple of the
  VAE factor) and hashed (metadata + file bytes), then decoded to uint8 RGB [N, 3, H, W].
* :class:`VAEModel` (the trainable: x, eps -> reconstruction, KL), :class:`VAELoss`
  (L1 + L2 + KL) and :class:`VAETask`, the task that ``llcm.training.train`` runs.
* :func:`latent_scaling_factor`, :func:`reconstruction_psnr`, :func:`load_vae`.

Choices, and why:

* **Loss** per image: ``mean|x - x_hat| + mean (x - x_hat)^2 + kl_weight * KL / D`` with D the number
  of pixel values (3HW) and KL summed over latent elements. Dividing the KL by D makes
  ``kl_weight`` mean the same as in the LDM / Stable Diffusion autoencoder recipe (reconstruction
  and KL both summed per image, kl_weight 1e-6), hence the default 1e-6: the KL only has to keep
  the posterior from collapsing to a point and the latents from drifting to huge values; a larger
  weight (1e-4 and up) visibly blurs reconstructions of small medical structures. The latent scale
  itself is fixed afterwards by the scaling factor, not by the KL.
* **No perceptual (LPIPS) or adversarial term**: both need a pretrained feature network, which
  cannot be downloaded here; reconstructions are therefore somewhat blurrier than SD's VAE.
* **Standardised latent channels** (opt-in, ``llcm train vae --standardize-latents``): when training
  ends, each latent channel's mean and std over the train images' posterior means are folded into the
  VAE's two 1x1 convolutions (``quant_conv`` and ``post_quant_conv``), so the saved VAE encodes to
  mean 0, std 1 per channel and decodes exactly as before. Why: an L1/L2 autoencoder's channels come
  out with offsets of a whole std or more and unequal spreads. At t = T the schedule keeps
  sqrt(alpha_bar_T) = 0.07 of the signal, so in training the teacher sees that offset in each image's
  spatial mean and relies on it; plain N(0, I) noise has none, and every sample drawn from it came
  out with the wrong per-channel mean: wrong brightness and colour casts, which the decoder turns
  into texture (the train/sample mismatch of Lin et al., "Common diffusion noise schedules and sample
  steps are flawed"; SD3's VAE carries a ``shift_factor`` for it, which SD-1.5-style pipelines such as
  diffusers' LCM pipeline ignore: folding keeps the folder a plain SD-style VAE). Measured on the
  gpu-profile default model: its teacher's sampled latents had channel means (-0.1, 0.1, 0.0, 0.0)
  where the data's are (-0.3, -1.0, 0.1, -1.4). Samplers now start from the offset instead
  (``latent_mean``, :func:`llcm.sampling.initial_latents`): on that model the teacher's class
  accuracy went from 61% to 70% and the 4-step student's from 48.5% to 63.5% (README, "The default
  model"). Standardising is opt-in because, with that start, it measured as a tie: two teachers at
  the cpu profile's budget (700 x 64) on the same VAE's latents, raw vs standardised, gave FID 245.8
  vs 248.1 and class accuracy 49% vs 53% (`llcm evaluate`, DDIM-50, 200 images each).
* **Scaling factor** = 1 / std of the *posterior means* of all train images (all elements pooled,
  as SD's 0.18215 was measured), because ``llcm encode`` caches posterior means: the cached latents
  of the train split then have std 1 exactly (after standardisation the factor is 1).
* **PSNR** is measured on the test split (train when there is none) with the posterior mean, on
  [0, 1] pixels, averaged over images; beside it, the PSNR of predicting the train mean image,
  the trivial baseline a VAE must beat.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llcm.errors import UserError
from llcm.fileio import atomic_folder, drop_load_paths
from llcm.training import TaskBase

Tensor = torch.Tensor

DEFAULT_KL_WEIGHT = 1e-6
HARD_PIXEL_SHARE = 0.02  # the "worst pixels" of VAELoss's hard-pixel term: 2% (82 of a 64x64 image)
ANCHOR_NOISE = 0.5  # anchor rows decode the initial latents plus noise of std up to this (model units)


# ---------------------------------------------------------------------------------------- images

@dataclass
class ImageSplit:
    """One checked split of an imagefolder dataset (pixels are loaded separately, on demand)."""

    root: Path  # the dataset folder
    split: str
    files: list[Path]
    texts: list[str]
    classes: list[str]
    height: int
    width: int
    data_hash: str  # sha256 over metadata rows (file_name, text, class) and file bytes

    def __len__(self) -> int:
        return len(self.files)


def _rows(root: Path, split: str) -> list[dict]:
    try:
        from llcm.data import read_split
    except ImportError:  # pragma: no cover - the builder package is part of llcm
        read_split = None
    try:
        if read_split is not None:
            rows = read_split(root, split)
        else:  # pragma: no cover
            rows = [json.loads(x) for x in (root / split / "metadata.jsonl").read_text("utf-8").splitlines()
                    if x.strip()]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
        raise UserError(f"{root / split / 'metadata.jsonl'} is not valid JSON lines: {exc}") from None
    for row in rows:
        if "file_name" not in row:
            raise UserError(f"{root / split / 'metadata.jsonl'}: a row has no file_name")
        if not row.get("path"):
            row["path"] = str(root / split / row["file_name"])
    return rows


def scan_split(data_dir: str | os.PathLike, split: str = "train", factor: int = 1) -> ImageSplit:
    """Check and hash a split: every image readable, all one size, sides a multiple of ``factor``."""
    from PIL import Image

    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"data folder not found: {data_dir}")
    meta = root / split / "metadata.jsonl"
    if not meta.is_file():
        raise UserError(f"{data_dir} has no {split!r} split ({split}/metadata.jsonl is missing); "
                        "make a dataset with `llcm data build` or `llcm data mini`")
    rows = _rows(root, split)
    if not rows:
        raise UserError(f"no images in the {split!r} split of {data_dir} ({meta} lists none)")
    digest = hashlib.sha256()
    files, texts, classes, sizes = [], [], [], {}
    for row in rows:
        path = Path(row["path"])
        text = str(row.get("text", row.get("class", "")))
        cls = str(row.get("class", text))
        try:
            data = path.read_bytes()
            with Image.open(path) as im:
                size = im.size  # (w, h), read from the header only
        except FileNotFoundError:
            raise UserError(f"image listed in {meta} not found: {path}") from None
        except OSError as exc:
            raise UserError(f"cannot read image {path}: {exc}") from None
        digest.update(json.dumps([row["file_name"], text, cls]).encode())
        digest.update(hashlib.sha256(data).digest())
        sizes.setdefault(size, path)
        files.append(path)
        texts.append(text)
        classes.append(cls)
    if len(sizes) > 1:
        (s1, p1), (s2, p2) = list(sizes.items())[:2]
        raise UserError(f"images have different sizes ({p1.name} is {s1[0]}x{s1[1]}, {p2.name} is {s2[0]}x{s2[1]}); "
                        "build the dataset with one --size (llcm data build crops squares)")
    (w, h), = sizes
    if h % factor or w % factor:
        raise UserError(f"image size {w}x{h} is not a multiple of the VAE factor {factor}; "
                        f"rebuild the dataset with --size a multiple of {factor}")
    return ImageSplit(root, split, files, texts, classes, h, w, digest.hexdigest()[:16])


def load_pixels(split: ImageSplit, indices: list[int] | range | None = None) -> Tensor:
    """Decode images to RGB uint8 [n, 3, H, W] (grayscale is repeated on the three channels)."""
    from PIL import Image

    idx = range(len(split)) if indices is None else indices
    out = torch.empty((len(idx), 3, split.height, split.width), dtype=torch.uint8)
    for j, i in enumerate(idx):
        with Image.open(split.files[i]) as im:
            arr = np.asarray(im.convert("RGB"))
        if arr.shape[:2] != (split.height, split.width):
            raise UserError(f"{split.files[i]} changed size since the dataset was scanned")
        out[j] = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    return out


def to_model_range(pixels: Tensor) -> Tensor:
    """uint8 [0, 255] -> float [-1, 1], the VAE's input range."""
    return pixels.float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------ VAEs

def vae_factor(vae) -> int:
    """Pixels per latent cell along one side: 2^(levels - 1) (8 for SD, 4 for tiny-cpu)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def build_vae(config: dict, seed: int = 0):
    """A random-weight AutoencoderKL from a config (e.g. a preset's "vae" entry); the global RNG is untouched."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL.from_config(config)


def find_vae_folder(path: str | os.PathLike) -> Path:
    """The AutoencoderKL folder inside ``path``: ``path/vae`` (a full model), ``path/model`` (a `llcm train vae`
    run) or ``path`` itself (a bare VAE folder). ``path`` is a --model argument: a folder, "default" or a Hugging
    Face id in the local cache (:func:`llcm.pipeline.resolve_model`)."""
    from llcm.pipeline import resolve_model

    folder = resolve_model(path)
    if not folder.is_dir():
        raise UserError(f"model folder not found: {path} (llcm never downloads weights: pass a local folder)")
    for cand in (folder / "vae", folder / "model", folder):
        cfg = cand / "config.json"
        if cfg.is_file():
            try:
                cls = json.loads(cfg.read_text(encoding="utf-8")).get("_class_name")
            except json.JSONDecodeError:
                continue
            if cls == "AutoencoderKL":
                return cand
    raise UserError(f"{path} holds no AutoencoderKL (expected vae/config.json, model/config.json or "
                    "config.json with _class_name AutoencoderKL)")


def load_vae(path: str | os.PathLike):
    """Load an AutoencoderKL from a local folder or a cached Hugging Face id (see :func:`find_vae_folder`), in
    eval mode."""
    from diffusers import AutoencoderKL

    folder = find_vae_folder(path)
    try:
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the VAE in {folder}: {exc}") from None
    return vae.eval()


def vae_hash(vae) -> str:
    """Digest of the VAE weights (:func:`llcm.models.model_hash`); the scaling factor is recorded apart."""
    from llcm.models import model_hash

    return model_hash(vae)


@torch.no_grad()
def posterior_means(vae, pixels: Tensor, batch: int = 32, progress: bool = False, desc: str = "encode") -> Tensor:
    """Posterior means E[z | x] (unscaled) of uint8 images, batch by batch, on the VAE's device."""
    from tqdm.auto import tqdm

    dev, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    out = []
    for i in tqdm(range(0, len(pixels), batch), desc=desc, disable=not progress, dynamic_ncols=True):
        x = to_model_range(pixels[i:i + batch]).to(dev, dtype)
        out.append(vae.encode(x).latent_dist.mean.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def standardize_latent_channels(vae, pixels: Tensor, batch: int = 32) -> dict:
    """Fold each latent channel's mean and std (posterior means of ``pixels``) into ``quant_conv`` and
    ``post_quant_conv``, in place: afterwards the VAE encodes ``pixels`` to mean 0, std 1 per channel,
    and decode(encode(x)) is unchanged. Returns the statistics that were folded."""
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise UserError("this VAE has no quant_conv/post_quant_conv to fold the latent statistics into")
    z = posterior_means(vae, pixels, batch).double()
    mu, sd = z.mean((0, 2, 3)), z.std((0, 2, 3))
    if not (torch.isfinite(sd).all() and (sd > 1e-8).all()):
        raise UserError(f"a latent channel has std {sd.tolist()}: training collapsed; retrain with a lower --lr")
    c = len(mu)
    q, p = vae.quant_conv, vae.post_quant_conv
    qw, qb = q.weight.double(), q.bias.double()
    pw, pb = p.weight.double(), p.bias.double()
    # encoder side: mean' = (mean - mu) / sd, logvar' = logvar - 2 log sd  (quant_conv rows [:c] | [c:])
    qw[:c] /= sd.view(c, 1, 1, 1)
    qb[:c] = (qb[:c] - mu) / sd
    qb[c:] -= 2 * sd.log()
    # decoder side: post_quant_conv(sd * z' + mu) = (W diag(sd)) z' + (b + W mu)
    pb += pw[:, :, 0, 0] @ mu
    pw *= sd.view(1, c, 1, 1)
    for conv, w, b in ((q, qw, qb), (p, pw, pb)):
        conv.weight.copy_(w.to(conv.weight.dtype))
        conv.bias.copy_(b.to(conv.bias.dtype))
    return {"channel_mean": [round(float(v), 6) for v in mu], "channel_std": [round(float(v), 6) for v in sd],
            "images": len(pixels)}


@torch.no_grad()
def latent_scaling_factor(vae, pixels: Tensor, batch: int = 32) -> tuple[float, dict]:
    """1 / std of the posterior means of ``pixels`` (all elements pooled), and the statistics behind it."""
    z = posterior_means(vae, pixels, batch)
    std = float(z.std())
    if not math.isfinite(std) or std < 1e-8:
        raise UserError(f"the VAE's latents have std {std}: training collapsed; retrain with a lower --lr")
    return 1.0 / std, {"latent_std": std, "latent_mean": float(z.mean()), "images": len(pixels)}


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [0, 1]: 10 log10(1 / MSE)."""
    mse = (x.float() - y.float()).square().flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


@torch.no_grad()
def reconstruct(vae, pixels: Tensor, batch: int = 32) -> Tensor:
    """Decode(posterior mean) of uint8 images, as floats in [0, 1] [n, 3, H, W]."""
    dev, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    out = []
    for i in range(0, len(pixels), batch):
        x = to_model_range(pixels[i:i + batch]).to(dev, dtype)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((rec.float().clamp(-1, 1) + 1) / 2).cpu())
    return torch.cat(out)


@torch.no_grad()
def reconstruction_psnr(vae, pixels: Tensor, batch: int = 32) -> float:
    """Mean over images of the PSNR (dB) of deterministic reconstructions (posterior mean)."""
    return float(psnr(reconstruct(vae, pixels, batch), pixels.float() / 255).mean())


def mean_image_psnr(train_pixels: Tensor, eval_pixels: Tensor) -> float:
    """PSNR of predicting the train mean image for every eval image: the trivial baseline."""
    mean = train_pixels.float().mean(0, keepdim=True) / 255
    return float(psnr(mean.expand(len(eval_pixels), -1, -1, -1), eval_pixels.float() / 255).mean())


# ---------------------------------------------------------------------------------- training task

class VAEModel(nn.Module):
    """The trainable: (x, eps) -> (reconstruction, KL per image); eps is drawn by the task (reproducible)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor, noise: Tensor, z_given: Tensor | None = None,
                given: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(decoded latents, KL per image, posterior mean); rows where ``given`` is true decode ``z_given``."""
        posterior = self.vae.encode(x).latent_dist
        # z = mu + sigma * eps, eps ~ N(0, I)  (reparameterisation, Kingma & Welling 2014)
        z = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
        if given is not None:
            z = torch.where(given.view(-1, 1, 1, 1), z_given.to(z.dtype), z)
        # KL(N(mu, sigma^2) || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2)
        return self.vae.decode(z).sample, posterior.kl(), posterior.mean


class VAELoss:
    """Per-image loss: mean|x - x_hat| + mean (x - x_hat)^2 + kl_weight * KL / (3HW) (LDM's weighting)
    + hard_pixel_weight * the mean squared error of the image's worst HARD_PIXEL_SHARE of pixels.

    Why the last term: a microaneurysm, an exudate or a small nodule covers 1-3 px of a 64 px image, so the
    plain means hardly change when the VAE drops it, and a tiny VAE does (the default model's first VAE
    lost every retinopathy finding). The worst pixels of an image are those missed findings (and edges),
    so weighting them makes the encoder keep them in the latents.

    Anchor rows (``batch["anchor"]`` true) keep an initial VAE's behaviour on the data a teacher was
    trained on, so that teacher and its students stay valid: the encoder through + anchor_weight *
    mean (s * (mu - mu_old))^2, the squared distance in the model's latent units (scaling factor s)
    between this VAE's posterior mean and the initial one; the decoder by decoding ``batch["z"]``
    (the initial posterior mean plus noise) with the initial decoder's output as its target
    (``batch["target"]``). The noise matters: a student's samples are near, not on, the latents of
    real images, and a decoder fitted only on those drew them with colour casts (README)."""

    def __init__(self, kl_weight: float = DEFAULT_KL_WEIGHT, hard_pixel_weight: float = 0.0,
                 anchor_weight: float = 0.0, scaling_factor: float = 1.0):
        if kl_weight < 0:
            raise UserError(f"kl_weight must be >= 0, got {kl_weight}")
        if hard_pixel_weight < 0:
            raise UserError(f"hard_pixel_weight must be >= 0, got {hard_pixel_weight}")
        if anchor_weight < 0:
            raise UserError(f"anchor_weight must be >= 0, got {anchor_weight}")
        self.kl_weight, self.hard_pixel_weight = kl_weight, hard_pixel_weight
        self.anchor_weight, self.scaling_factor = anchor_weight, scaling_factor

    def __call__(self, net: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        x = batch["x"]
        if "anchor" in batch:
            recon, kl, mean = net(x, batch["noise"], batch["z"], batch.get("given", batch["anchor"]))
        else:
            recon, kl, mean = net(x, batch["noise"])
        diff = recon.float() - batch.get("target", x).float()
        err = diff.flatten(1)
        loss = err.abs().mean(1) + err.square().mean(1) + self.kl_weight * kl.float() / err.shape[1]
        if self.hard_pixel_weight:
            per_pixel = diff.square().mean(1).flatten(1)  # [B, HW], squared error averaged over RGB
            k = max(1, round(HARD_PIXEL_SHARE * per_pixel.shape[1]))
            loss = loss + self.hard_pixel_weight * per_pixel.topk(k, dim=1).values.mean(1)
        if self.anchor_weight and "anchor" in batch:
            drift = (self.scaling_factor * (mean.float() - batch["anchor_mean"].float())).square().flatten(1).mean(1)
            loss = loss + self.anchor_weight * batch["anchor"].float() * drift
        return loss


class VAETask(TaskBase):
    """Train an AutoencoderKL on uint8 images held in memory (tiny datasets: N x 3 x H x W bytes)."""

    name = "vae"

    def __init__(self, vae, train_pixels: Tensor, eval_pixels: Tensor | None = None, eval_split: str = "test",
                 kl_weight: float = DEFAULT_KL_WEIGHT, steps: int = 0, source: dict | None = None,
                 standardize_latents: bool = False, hard_pixel_weight: float = 0.0,
                 anchor_pixels: Tensor | None = None, anchor_weight: float = 1.0,
                 anchor_latents: Tensor | None = None):
        """``anchor_pixels``: images (e.g. a teacher's training set) trained on with the others, whose latents
        must stay what ``vae`` gives them now (VAELoss's anchor term); the saved VAE then keeps ``vae``'s
        scaling factor instead of measuring a new one, so a teacher trained on its latents stays valid.
        ``anchor_latents`` (unscaled, e.g. a student's samples; needs ``anchor_pixels``): latents without
        images that the decoder must decode as ``vae`` does now."""
        if train_pixels.dtype != torch.uint8 or train_pixels.ndim != 4 or train_pixels.shape[1] != 3:
            raise ValueError("train_pixels must be uint8 [N, 3, H, W]")
        self.anchor_means, self.n_free = None, len(train_pixels)
        self.n_images = len(train_pixels) + (0 if anchor_pixels is None else len(anchor_pixels))
        if anchor_latents is not None and anchor_pixels is None:
            raise UserError("latents to decode as the initial VAE does need anchor images too")
        if anchor_pixels is not None and len(anchor_pixels):
            if anchor_pixels.shape[1:] != train_pixels.shape[1:]:
                raise UserError(f"anchor images are {tuple(anchor_pixels.shape[2:])} but the train images are "
                                f"{tuple(train_pixels.shape[2:])}")
            if standardize_latents:
                raise UserError("anchored latents keep the initial VAE's units: do not combine with "
                                "--standardize-latents")
            was = vae.training
            self.anchor_means = posterior_means(vae.eval(), anchor_pixels)  # the initial VAE's, fixed
            if anchor_latents is not None:  # rows with a latent and no image (a blank image, for the encoder)
                self.anchor_means = torch.cat([self.anchor_means, anchor_latents.float()])
            self.anchor_decoder = copy.deepcopy(vae).eval().requires_grad_(False)  # the initial VAE, frozen
            vae.train(was)
            train_pixels = torch.cat([train_pixels, anchor_pixels])
            if anchor_latents is not None:
                train_pixels = torch.cat([train_pixels, torch.zeros((len(anchor_latents), *train_pixels.shape[1:]),
                                                                    dtype=torch.uint8)])
        f = vae_factor(vae)
        h, w = train_pixels.shape[-2:]
        if h % f or w % f:
            raise UserError(f"image size {w}x{h} is not a multiple of the VAE factor {f}")
        if eval_pixels is None or len(eval_pixels) == 0:
            eval_pixels, eval_split = train_pixels, "train"
        self.train_pixels, self.eval_pixels, self.eval_split = train_pixels, eval_pixels, eval_split
        self.latent_shape = (int(vae.config.latent_channels), h // f, w // f)
        self.kept_scaling_factor = float(vae.config.scaling_factor) if self.anchor_means is not None else None
        self.loss_fn = VAELoss(kl_weight, hard_pixel_weight, anchor_weight if self.anchor_means is not None else 0.0,
                               self.kept_scaling_factor or 1.0)
        self.steps, self.source = steps, source or {}
        self.standardize_latents = standardize_latents
        vae.train()
        self.trainable = VAEModel(vae)
        self.report: dict | None = None

    def num_examples(self) -> int:
        return len(self.train_pixels)

    def draw(self, idx: Tensor, gen: torch.Generator) -> dict[str, Tensor]:
        x = to_model_range(self.train_pixels[idx])
        batch = {"x": x, "noise": torch.randn((len(idx), *self.latent_shape), generator=gen)}
        if self.anchor_means is not None:
            given = idx >= self.n_free  # rows decoded from the initial latents (+ noise)
            anchor = given & (idx < self.n_images)  # ... of which those with an image: the encoder holds them
            means = torch.zeros((len(idx), *self.anchor_means.shape[1:]))
            means[given] = self.anchor_means[idx[given] - self.n_free]
            # the initial latents plus noise of a random std in [0, ANCHOR_NOISE] (model units), and what
            # the initial decoder makes of them
            spread = torch.rand(len(idx), generator=gen).view(-1, 1, 1, 1) * ANCHOR_NOISE / self.kept_scaling_factor
            z = means + spread * torch.randn(means.shape, generator=gen)
            target = x.clone()
            if given.any():
                with torch.no_grad():
                    dec = self.anchor_decoder
                    target[given] = dec.decode(z[given].to(next(dec.parameters()).device)).sample.float().cpu()
            batch.update(anchor=anchor, given=given, anchor_mean=means, z=z, target=target)
        return batch

    def evaluate(self, vae=None) -> dict:
        """Scaling factor from the train latents, reconstruction PSNR on the eval split."""
        vae = self.trainable.vae if vae is None else vae
        was = vae.training
        vae.eval()
        try:
            scale, stats = latent_scaling_factor(vae, self.train_pixels[:self.n_images])
            anchored = {}
            if self.anchor_means is not None:  # the teacher's units: keep the initial scaling factor
                scale = self.kept_scaling_factor
                new = posterior_means(vae, self.train_pixels[self.n_free:self.n_images])
                held = self.anchor_means[:len(new)]
                rms = lambda t: float(t.square().mean().sqrt())  # noqa: E731
                anchored = {"anchor_images": len(new), "anchor_weight": self.loss_fn.anchor_weight,
                            "anchor_decoded_latents": len(self.anchor_means) - len(new),
                            "anchor_latent_drift_rel": round(rms(new - held) / rms(held), 5)}
            result = {
                "psnr_db": round(reconstruction_psnr(vae, self.eval_pixels), 4),
                "psnr_split": self.eval_split,
                "psnr_images": len(self.eval_pixels),
                "baseline_mean_image_psnr_db": round(mean_image_psnr(self.train_pixels[:self.n_images],
                                                                     self.eval_pixels), 4),
                "scaling_factor": scale,
                "scaling_factor_from": "kept from the initial VAE (anchored latents)" if anchored else
                f"1/std of posterior means of {stats['images']} train images",
                **anchored,
                "latent_std_unscaled": stats["latent_std"],
                "latent_mean_unscaled": stats["latent_mean"],
            }
        finally:
            vae.train(was)
        return result

    def save_model(self, folder: Path) -> Path:
        """`folder` becomes a diffusers AutoencoderKL folder (safetensors, scaling factor in its config)
        plus vae_report.json; written beside it and renamed into place."""
        import copy

        vae, folded = self.trainable.vae, None
        if self.standardize_latents:  # fold into a copy: the trainable stays as trained (resume)
            vae = copy.deepcopy(vae).eval()
            folded = standardize_latent_channels(vae, self.train_pixels)
        ev = self.evaluate(vae)
        vae.register_to_config(scaling_factor=ev["scaling_factor"])
        h, w = self.train_pixels.shape[-2:]
        if h == w:
            vae.register_to_config(sample_size=int(h))
        report = {**ev, "steps": self.trained_steps or self.steps, "kl_weight": self.loss_fn.kl_weight,
                  "hard_pixel_weight": self.loss_fn.hard_pixel_weight,
                  "loss": "L1 + L2 + kl_weight * KL / (3HW) + hard_pixel_weight * mean squared error of the worst "
                          f"{HARD_PIXEL_SHARE:.0%} of pixels; no perceptual term (no offline feature network)",
                  "standardized_latent_channels": folded and {**folded, "from": "posterior means of the train "
                                                              "images, folded into quant_conv/post_quant_conv"},
                  "image_size": [int(h), int(w)], "latent_shape": list(self.latent_shape),
                  "train_images": self.n_images, "vae_hash": vae_hash(vae), **self.source}
        folder = Path(folder)
        with atomic_folder(folder) as tmp:
            vae.save_pretrained(tmp, safe_serialization=True)
            drop_load_paths(tmp)  # an --init VAE would record the path it was loaded from
            (tmp / "vae_report.json").write_text(json.dumps(report, indent=2))
        self.report = report
        return folder

    @torch.no_grad()
    def sample_grid(self):
        """Top row: eval images; bottom row: their reconstructions."""
        from PIL import Image

        from llcm.images import make_grid

        vae = self.trainable.vae
        was = vae.training
        vae.eval()
        px = self.eval_pixels[:8]
        rec = reconstruct(vae, px)
        vae.train(was)
        orig = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in px]
        recs = [Image.fromarray((r.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for r in rec]
        return make_grid(orig + recs, cols=len(px))
