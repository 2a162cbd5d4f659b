"""Writing output folders so that a crash never leaves a half-written one in place, and naming other folders in
what is written: never by an absolute path of the machine that wrote it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to fill; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def record_name(path: str | os.PathLike) -> str:
    """How a saved record names a folder it only describes (provenance): the path as given when it is relative
    (or a name such as "default"), else the folder's own name. Never an absolute path of this machine; the
    content hash recorded beside it (data_hash, vae_hash, ...) is what identifies the folder."""
    text = os.fspath(path)
    return Path(text).name if os.path.isabs(os.path.expanduser(text)) else text


def link_to(target: str | os.PathLike, folder: str | os.PathLike) -> str:
    """How an artefact in `folder` records another folder it must find again: relative to `folder`, so the two
    can be moved (or copied to another machine) together. Read back with :func:`follow_link`."""
    return os.path.relpath(Path(target).expanduser().resolve(), Path(folder).expanduser().resolve())


def follow_link(link: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """The folder a record in `folder` links to: relative links (:func:`link_to`) resolved against `folder`;
    an absolute one (what older llcm versions wrote) as it is."""
    return (Path(folder).expanduser() / Path(link).expanduser()).resolve()


def drop_load_paths(folder: str | os.PathLike) -> None:
    """Remove ``_name_or_path`` from the config.json files that diffusers/transformers wrote under `folder`: it is
    the path each model was loaded from, on the machine that saved it, and loading sets it anew."""
    for f in sorted(Path(folder).rglob("config.json")):
        config = json.loads(f.read_text(encoding="utf-8"))
        if "_name_or_path" in config:
            del config["_name_or_path"]
            f.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
