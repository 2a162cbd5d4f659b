"""Hugging Face model ids (org/name[@revision]) resolve through the local HF cache, offline, as diffusers'
from_pretrained finds them: a cache built here as `hf download` leaves one (blobs, snapshot links, refs/main)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_checks import one_error_line
from llcm.cli import main
from llcm.errors import UserError

REPO = "acme/tiny-llcm"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
GEN = ["--steps", "2", "--batch", "2", "--seed", "3"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A tiny llcm model (the tiny-cpu preset's untrained weights), saved once."""
    from llcm.pipeline import load_pipeline

    return load_pipeline("tiny-cpu").save(tmp_path_factory.mktemp("model") / "tiny-llcm")


def fill_cache(cache: Path, repo_id: str, commit: str, src: Path, ref: str = "main") -> Path:
    """What `hf download repo_id` leaves: the files in blobs/ by digest, snapshots/<commit>/ linking to them,
    refs/<ref> holding the commit. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch, model_folder) -> Path:
    """A Hugging Face cache holding acme/tiny-llcm at COMMIT (main), selected by HF_HUB_CACHE, offline."""
    hub = tmp_path / "hf" / "hub"
    fill_cache(hub, REPO, COMMIT, model_folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)  # the older name would come first
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local folder acme/tiny-llcm here
    return hub


def pixels(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("0*.png"))]


def test_resolver_finds_snapshots_and_names_them_by_commit(cache, tmp_path, monkeypatch, model_folder):
    from llcm.hub import split_hub_id
    from llcm.pipeline import model_record, resolve_model

    assert split_hub_id("acme/tiny-llcm@v1.0") == (REPO, "v1.0") and split_hub_id(REPO) == (REPO, None)
    for path in ("runs/x/model", "./acme/x", "../acme", "/abs/x", "default", "tiny-cpu", "a/b@", "a--b/c"):
        assert split_hub_id(path) is None, path
    snapshot = cache / "models--acme--tiny-llcm" / "snapshots" / COMMIT
    for spec in (REPO, f"{REPO}@main", f"{REPO}@{COMMIT}"):
        assert resolve_model(spec).resolve() == snapshot.resolve()
        assert model_record(spec) == f"{REPO}@{COMMIT}"
    assert resolve_model("runs/x/model") == Path("runs/x/model")  # not an id: a path, checked by its caller
    assert model_record(model_folder) == "tiny-llcm"  # a local folder: by name, as before
    # HF_HOME/hub when HF_HUB_CACHE is not set
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    assert resolve_model(REPO).resolve() == snapshot.resolve()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    with pytest.raises(UserError, match=f"{tmp_path / 'empty' / 'hub'}.*hf download {REPO}"):
        resolve_model(REPO)
    # a local folder spelled like the id wins
    shutil.copytree(model_folder, tmp_path / "acme" / "tiny-llcm")
    assert resolve_model(REPO) == Path(REPO) and model_record(REPO) == REPO


def test_never_the_network_even_without_hf_hub_offline(cache, monkeypatch):
    import socket

    from llcm.pipeline import resolve_model

    def refuse(*args, **kwargs):
        raise AssertionError("llcm tried to use the network")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    assert resolve_model(f"{REPO}@main").name == COMMIT
    with pytest.raises(UserError, match="never downloads, HF_HUB_OFFLINE or not"):
        resolve_model("acme/elsewhere")


def test_generate_by_id_equals_the_local_folder(cache, tmp_path, capsys, model_folder):
    assert main(["generate", "x", "--model", str(model_folder), "--out", "local", *GEN]) == 0
    want = pixels(tmp_path / "local")
    assert len(want) == 2
    for i, spec in enumerate((REPO, f"{REPO}@main", f"{REPO}@{COMMIT}")):
        assert main(["generate", "x", "--model", spec, "--out", f"hub{i}", *GEN]) == 0
        got = pixels(tmp_path / f"hub{i}")
        assert len(got) == 2 and all(np.array_equal(a, b) for a, b in zip(got, want)), spec
        records = json.loads((tmp_path / f"hub{i}" / "generation.json").read_text())
        assert {r["model"] for r in records} == {f"{REPO}@{COMMIT}"}  # the id and its commit, not a folder
    assert str(cache) not in capsys.readouterr().out


def test_missing_id_or_revision_is_one_line_naming_the_cache(cache, tmp_path, capsys):
    for spec, what in (("acme/nothing", "has no acme/nothing (revision main)"),
                       (f"{REPO}@v2", f"has {REPO} but not revision v2 (cached: main ({COMMIT[:12]}))"),
                       (f"{REPO}@{'f' * 40}", f"not revision {'f' * 40}")):
        assert main(["generate", "x", "--model", spec, "--out", "o"]) == 2
        line = one_error_line(capsys)
        assert line.startswith("llcm generate: error: ") and spec in line, line
        assert what in line and str(cache) in line and "hf download" in line and "local folder" in line, line
    assert not (tmp_path / "o").exists()
    # every command that takes a model says the same
    assert main(["encode", "--data", "data", "--model", "acme/nothing", "--out", "lat"]) == 2
    assert "has no acme/nothing" in one_error_line(capsys)


def test_local_folder_named_like_an_id_wins(cache, tmp_path):
    shutil.copytree(cache / "models--acme--tiny-llcm" / "snapshots" / COMMIT, tmp_path / "acme" / "tiny-llcm",
                    symlinks=False)
    shutil.rmtree(cache)  # the id is no longer cached: only the local folder can answer
    assert main(["generate", "x", "--model", REPO, "--out", "o", *GEN]) == 0
    records = json.loads((tmp_path / "o" / "generation.json").read_text())
    assert records[0]["model"] == "tiny-llcm"


def test_records_name_the_id_and_commit_never_the_cache(cache, tmp_path, capsys):
    """encode with the hub model's VAE, then an LCF adapter on it: the latents, the run config and the adapter
    name the id at its commit; the adapter finds its base in the cache again."""
    from test_vae_encode import make_dataset

    data = make_dataset(tmp_path / "data", per_class=(2, 0))
    assert main(["encode", "--data", str(data), "--model", REPO, "--out", "lat", "--quiet"]) == 0
    pinned = f"{REPO}@{COMMIT}"
    assert json.loads((tmp_path / "lat" / "latents.json").read_text())["vae_source"] == pinned
    assert main(["finetune", "--model", REPO, "--latents", "lat", "--out", "ft", "--steps", "1", "--batch", "2",
                 "--quiet", "--lora-rank", "2", "--replay", "0"]) == 0
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["args"]["model"] == pinned
    assert json.loads((tmp_path / "ft" / "model" / "llcm.json").read_text())["adapter"]["base"] == pinned
    assert main(["generate", "x", "--model", "ft/model", "--out", "gen", *GEN]) == 0
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".md", ".txt")
               and cache not in p.parents]
    assert written and not [p for p in written if str(tmp_path) in p.read_text()]  # the cache is inside it
    capsys.readouterr()
