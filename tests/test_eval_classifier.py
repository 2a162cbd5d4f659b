"""The evaluation classifier (llcm.evaluation.classifier): it learns separable classes, generalizes to held-out
images, cannot learn shuffled labels, is a function of its seed, and its cache round-trips through safetensors.

The data: 3 classes of 32x32 patterns (horizontal stripes, vertical stripes, a bright blob) with random
phase, period, contrast and noise, written as PNGs in the imagefolder layout of `llcm data build`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llcm.evaluation.classifier import (Classifier, ClassifierSettings, cache_key, cached_classifier,
                                        train_classifier)

CLASSES = ("h-stripes", "v-stripes", "blob")
FAST = ClassifierSettings(size=32)  # the tests' images are 32 px; the default (64) only upsamples them
EPOCHS = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pattern(cls: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size].astype(float)
    if cls == 2:
        cx, cy, r = rng.uniform(8, 24, 2).tolist() + [rng.uniform(3, 6)]
        img = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    else:
        period, phase = rng.uniform(4, 9), rng.uniform(0, 2 * np.pi)
        img = 0.5 + 0.5 * np.sin(2 * np.pi * (yy if cls == 0 else xx) / period + phase)
    img = rng.uniform(0.5, 1.0) * img + rng.uniform(0, 0.3) + rng.normal(0, 0.08, img.shape)
    tint = rng.uniform(0.7, 1.0, 3)
    return (np.clip(img[..., None] * tint, 0, 1) * 255).astype(np.uint8)


def write_split(root: Path, split: str, n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    rows, paths, labels = [], [], []
    for c, name in enumerate(CLASSES):
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            fn = f"{name}/{i:03d}.png"
            Image.fromarray(pattern(c, rng)).save(root / split / fn)
            rows.append({"file_name": fn, "text": name.replace("-", " "), "class": name})
            paths.append(str(root / split / fn))
            labels.append(name)
    (root / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths, labels


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("clfdata")
    return write_split(root, "train", 30, seed=0), write_split(root, "test", 10, seed=1), root


@pytest.fixture(scope="module")
def trained(data):
    (paths, labels), _, _ = data
    return train_classifier(paths, labels, seed=0, epochs=EPOCHS, settings=FAST)


def accuracy(pred, labels) -> float:
    return float(np.mean([p == t for p, t in zip(pred, labels, strict=True)]))


def test_learns_separable_classes_and_generalizes(trained, data):
    (paths, labels), (test_paths, test_labels), _ = data
    assert trained.classes == sorted(CLASSES) and trained.info["n_train"] == 90
    assert accuracy(trained.predict(paths), labels) >= 0.95
    assert accuracy(trained.predict(test_paths), test_labels) >= 0.9  # 30 images it never saw
    # uint8 arrays give the same answers as the files they were read from
    arrays = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in test_paths])
    assert trained.predict(arrays) == trained.predict(test_paths)
    assert trained.accuracy(test_paths, test_labels) == accuracy(trained.predict(test_paths), test_labels)


def test_shuffled_labels_give_chance_accuracy(trained, data):
    """The same training on labels permuted at random: no signal to learn, so held-out accuracy falls to
    about 1/3 (the check that a high accuracy above is earned, not an artefact of the test set)."""
    (paths, labels), (test_paths, test_labels), _ = data
    shuffled = list(np.random.default_rng(5).permutation(labels))
    assert accuracy(shuffled, labels) < 0.5
    clf = train_classifier(paths, shuffled, seed=0, epochs=EPOCHS, settings=FAST)
    real = accuracy(trained.predict(test_paths), test_labels)
    chance = accuracy(clf.predict(test_paths), test_labels)
    assert chance <= 0.6 and real - chance >= 0.3, (real, chance)


def test_same_seed_same_weights(trained, data):
    (paths, labels), (test_paths, _), _ = data
    again = train_classifier(paths, labels, seed=0, epochs=EPOCHS, settings=FAST)
    a, b = trained.net.state_dict(), again.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(trained.logits(test_paths), again.logits(test_paths))
    other = train_classifier(paths, labels, seed=1, epochs=1, settings=FAST)
    first = train_classifier(paths, labels, seed=0, epochs=1, settings=FAST)
    assert not torch.equal(other.net.head.weight, first.net.head.weight)
    # training touches no global random state
    torch.manual_seed(123)
    x = torch.rand(3)
    torch.manual_seed(123)
    train_classifier(paths[::15], labels[::15], seed=0, epochs=1, settings=FAST)
    assert torch.equal(torch.rand(3), x)


def test_save_load_round_trip(trained, data, tmp_path):
    _, (test_paths, _), _ = data
    f = trained.save(tmp_path / "clf.safetensors")
    meta = json.loads(f.with_suffix(".json").read_text())
    assert meta["classes"] == trained.classes and meta["settings"]["size"] == 32 and meta["n_train"] == 90
    with open(f, "rb") as fh:  # a safetensors file: 8-byte header length, then a JSON header
        n = int.from_bytes(fh.read(8), "little")
        assert json.loads(fh.read(n))["__metadata__"]["format"] == "llcm-classifier-v1"
    loaded = Classifier.load(f)
    assert loaded.classes == trained.classes and loaded.settings == trained.settings
    assert torch.equal(loaded.logits(test_paths), trained.logits(test_paths))


def test_cache_trains_once_and_keys_on_files_labels_settings(data, tmp_path):
    (paths, labels), (test_paths, _), _ = data
    few, few_labels = paths[::6], labels[::6]
    clf, hit = cached_classifier(tmp_path, few, few_labels, seed=0, epochs=1)
    assert not hit and len(list(tmp_path.glob("classifier-*.safetensors"))) == 1
    again, hit = cached_classifier(tmp_path, few, few_labels, seed=0, epochs=1)
    assert hit and torch.equal(again.logits(test_paths[:4]), clf.logits(test_paths[:4]))
    assert again.info["seconds"] == clf.info["seconds"]
    s = ClassifierSettings(epochs=1)
    key = cache_key(few, few_labels, s)
    assert key != cache_key(few, few_labels[::-1], s)
    assert key != cache_key(few, few_labels, dataclasses.replace(s, seed=1))
    assert key != cache_key(few[::-1], few_labels[::-1], s)


def test_needs_two_classes_and_matching_labels(data):
    (paths, labels), _, _ = data
    with pytest.raises(ValueError, match="2 classes"):
        train_classifier(paths[:3], labels[:3], epochs=1, settings=FAST)
    with pytest.raises(ValueError, match="labels"):
        train_classifier(paths[:3], labels[:2], epochs=1, settings=FAST)


def test_cli_default_epochs_is_the_classifiers():
    """`llcm evaluate --help` states the default without importing torch; it must match the module's."""
    import argparse

    from llcm.cli.evaluate import register as register_evaluate
    from llcm.evaluation.classifier import DEFAULT_EPOCHS
    from llcm.evaluation.evaluate import EvalConfig

    parser = argparse.ArgumentParser()
    register_evaluate(parser.add_subparsers())
    text = " ".join(parser._subparsers._group_actions[0].choices["evaluate"].format_help().split())
    assert f"(default {DEFAULT_EPOCHS};" in text and "--no-classifier" in text
    assert EvalConfig("data", [], "out").classifier_epochs == DEFAULT_EPOCHS
