"""A small CNN image classifier: does a generated image show the class it was prompted for?

    clf = train_classifier(train_paths, train_labels, seed=0)     # every train image, nothing held out
    clf.predict(test_paths)                                       # -> ["chest-xray", ...]
    clf.save("cache/classifier-<key>.safetensors"); Classifier.load(...)

The net: a stride-1 3x3 conv stem, then 4 x [3x3 conv, stride 2 -> GroupNorm -> ReLU] (64 px -> 4 px; 16, 32,
64, 128 channels), global average and max pooling side by side, one linear layer; images resized to SIZE x
SIZE RGB in [0, 1], then mapped to [-1, 1]. No augmentation (a flip can change a class: left vs right). AdamW
with a cosine learning-rate decay for a fixed number of epochs. Every random choice (initial weights,
shuffling) comes from one torch.Generator seeded by `seed`, and GroupNorm behaves the same in training and
inference, so one seed gives one set of weights on a given machine and thread count. Weights are stored with
safetensors and a JSON beside them (classes, settings, training time); never pickled.

`llcm evaluate` trains it on the train split and reports, per run, the share of generated images the
classifier assigns to their prompt's class, next to its accuracy on the real test split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

FORMAT = "llcm-classifier-v1"
DEFAULT_EPOCHS = 12
ImagesLike = Sequence[str | os.PathLike] | Sequence[np.ndarray] | np.ndarray


@dataclass(frozen=True)
class ClassifierSettings:
    size: int = 64  # images are resized to size x size
    width: int = 16  # channels of the first conv; doubled at each of the `depth` stride-2 convs
    depth: int = 4
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 64
    lr: float = 2e-3  # AdamW peak learning rate, cosine-decayed to 0 over the run
    weight_decay: float = 0.05
    seed: int = 0


class SmallCNN(nn.Module):
    """stem -> [conv 3x3 stride 2 -> GroupNorm -> ReLU] x depth -> [average pool, max pool] -> linear."""

    def __init__(self, n_classes: int, width: int = 16, depth: int = 4):
        super().__init__()
        # a stride-1 stem keeps single-pixel findings (microaneurysms, a small nodule) before downsampling
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.GroupNorm(8, width),
                                   nn.ReLU(inplace=True)]
        c_in = width
        for i in range(depth):
            c_out = width * 2 ** i
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8, c_out),
                       nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * c_in, n_classes)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """He-normal convs, zero-mean small linear head, unit GroupNorm: all drawn from `generator`."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
                elif isinstance(m, nn.GroupNorm):
                    m.weight.fill_(1.0)
                    m.bias.zero_()
            nn.init.normal_(self.head.weight, 0.0, 0.01, generator=generator)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        # average pooling sees what an image is made of, max pooling whether a small finding is anywhere
        return self.head(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))


# ----------------------------------------------------------------------------------------------
# Pixels


def to_batch(images: ImagesLike, size: int) -> torch.Tensor:
    """Paths or uint8 images (any size, grey or RGB) -> uint8 tensor [N, 3, size, size] (PIL bilinear resize)."""
    from PIL import Image

    from llcm.evaluation.features import as_image_list, load_image

    if isinstance(images, (np.ndarray, torch.Tensor)):
        arrays = as_image_list(images)
    else:
        items = list(images)
        arrays = as_image_list([load_image(p) if isinstance(p, (str, os.PathLike)) else np.asarray(p)
                                for p in items]) if items else []
    out = np.empty((len(arrays), size, size, 3), np.uint8)
    for i, a in enumerate(arrays):
        out[i] = a if a.shape[:2] == (size, size) else \
            np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _scale(x: torch.Tensor) -> torch.Tensor:
    # uint8 [0, 255] -> [0, 1] -> [-1, 1]
    return x.float().div(127.5).sub(1.0)


# ----------------------------------------------------------------------------------------------
# The classifier


class Classifier:
    """A trained SmallCNN with its class names and settings."""

    def __init__(self, net: SmallCNN, classes: Sequence[str], settings: ClassifierSettings, info: dict | None = None):
        self.net, self.classes, self.settings = net.eval(), list(classes), settings
        self.info = dict(info or {})  # n_train, seconds, key, ... (saved in the JSON)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def logits(self, images: ImagesLike, batch_size: int = 256) -> torch.Tensor:
        """float [N, n_classes]; images are read and resized `batch_size` at a time."""
        n = len(images)
        out = [self.net(_scale(to_batch(images[i:i + batch_size], self.settings.size).to(self.device))).cpu()
               for i in range(0, n, batch_size)]
        return torch.cat(out) if out else torch.zeros(0, len(self.classes))

    def predict(self, images: ImagesLike, batch_size: int = 256) -> list[str]:
        """The most likely class name of each image."""
        return [self.classes[j] for j in self.logits(images, batch_size).argmax(1).tolist()]

    def accuracy(self, images: ImagesLike, labels: Sequence[str]) -> float:
        pred = self.predict(images)
        return float(np.mean([p == t for p, t in zip(pred, labels, strict=True)])) if pred else float("nan")

    def save(self, path: str | os.PathLike) -> Path:
        """PATH (.safetensors weights) + PATH with .json (classes, settings, info), each written atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(tmp), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "classes": self.classes, "settings": dataclasses.asdict(self.settings),
                **self.info}
        jtmp = path.with_name(f".{path.stem}.json.{os.getpid()}.tmp")
        jtmp.write_text(json.dumps(meta, indent=2))
        os.replace(jtmp, meta_path(path))
        os.replace(tmp, path)  # last: the weights exist only when their JSON does
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "Classifier":
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads(meta_path(path).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not an {FORMAT} classifier")
        settings = ClassifierSettings(**meta["settings"])
        net = _empty_net(len(meta["classes"]), settings)
        net.load_state_dict(load_file(str(path)))
        info = {k: v for k, v in meta.items() if k not in ("format", "classes", "settings")}
        return cls(net.to(device), meta["classes"], settings, info)


def _empty_net(n_classes: int, s: ClassifierSettings) -> SmallCNN:
    """A SmallCNN with uninitialized weights (built on the meta device: no default init, no global RNG)."""
    with torch.device("meta"):
        net = SmallCNN(n_classes, s.width, s.depth)
    return net.to_empty(device="cpu")


def meta_path(weights: str | os.PathLike) -> Path:
    return Path(weights).with_suffix(".json")


def train_classifier(images: ImagesLike, labels: Sequence[str], seed: int = 0, epochs: int = DEFAULT_EPOCHS,
                     settings: ClassifierSettings | None = None, device: torch.device | str = "cpu",
                     progress: bool = False) -> Classifier:
    """Train a SmallCNN on every given image (nothing held out) with AdamW + cosine decay for `epochs` epochs.

    `settings` overrides everything but `seed` and `epochs`, which are always taken from the arguments.
    """
    s = dataclasses.replace(settings or ClassifierSettings(), seed=seed, epochs=epochs)
    labels = [str(v) for v in labels]
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {classes}")
    t0 = time.perf_counter()
    x = to_batch(images, s.size)  # uint8, all in memory: 3000 64 px images = 37 MB
    y = torch.tensor([classes.index(v) for v in labels])
    g = torch.Generator().manual_seed(s.seed)
    net = _empty_net(len(classes), s)
    net.reset_parameters(g)  # every weight from g; the global random state is left alone
    net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    per_epoch = math.ceil(len(y) / s.batch_size)
    total = max(1, s.epochs * per_epoch)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="classifier", disable=not progress, dynamic_ncols=True)
    step, loss = 0, float("nan")
    for _ in range(s.epochs):
        order = torch.randperm(len(y), generator=g)
        for j in range(0, len(y), s.batch_size):
            idx = order[j:j + s.batch_size]
            for group in opt.param_groups:  # cosine decay: lr_t = lr / 2 * (1 + cos(pi t / T))
                group["lr"] = 0.5 * s.lr * (1 + math.cos(math.pi * step / total))
            out = net(_scale(x[idx]).to(device))
            batch_loss = F.cross_entropy(out, y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            batch_loss.backward()
            opt.step()
            step, loss = step + 1, float(batch_loss.detach())
            bar.update(1)
    bar.close()
    info = {"n_train": len(y), "steps": step, "final_loss": loss, "seconds": time.perf_counter() - t0,
            "per_class_n_train": {c: labels.count(c) for c in classes}, "torch_threads": torch.get_num_threads(),
            "device": str(device)}
    return Classifier(net, classes, s, info)


def cache_key(paths: Sequence[str | os.PathLike], labels: Sequence[str], settings: ClassifierSettings) -> str:
    """What a cached classifier depends on: the train files (path, size), their labels, the settings."""
    h = hashlib.sha1(FORMAT.encode())
    h.update(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    for p, v in zip(paths, labels, strict=True):
        p = Path(p)
        h.update(f"{p.as_posix()}\t{p.stat().st_size}\t{v}\n".encode())
    return h.hexdigest()[:16]


def cached_classifier(cache_dir: str | os.PathLike, paths: Sequence[str | os.PathLike], labels: Sequence[str],
                      seed: int = 0, epochs: int = DEFAULT_EPOCHS, device: torch.device | str = "cpu",
                      progress: bool = False) -> tuple[Classifier, bool]:
    """Load CACHE/classifier-<key>.safetensors, or train and save it. Returns (classifier, loaded_from_cache)."""
    settings = dataclasses.replace(ClassifierSettings(), seed=seed, epochs=epochs)
    key = cache_key(paths, labels, settings)
    f = Path(cache_dir) / f"classifier-{key}.safetensors"
    if f.is_file() and meta_path(f).is_file():
        return Classifier.load(f, device), True
    clf = train_classifier([str(p) for p in paths], labels, seed=seed, epochs=epochs, device=device,
                           progress=progress)
    clf.info["key"] = key
    clf.save(f)
    return clf, False


__all__ = ["Classifier", "ClassifierSettings", "SmallCNN", "train_classifier", "cached_classifier", "cache_key",
           "to_batch", "DEFAULT_EPOCHS"]
