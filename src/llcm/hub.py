"""Hugging Face model ids as model folders: ``org/name`` or ``org/name@revision`` names the snapshot that the
local Hugging Face cache already holds, found as diffusers' ``from_pretrained`` finds it offline.

The lookup is huggingface_hub's own (``snapshot_download(..., local_files_only=True)``): the cache is
``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``, with a branch or tag read through
``refs/<revision>`` and a commit hash taken as is. Nothing is ever downloaded, whether HF_HUB_OFFLINE is set or
not: a model that is not in the cache is a :class:`~llcm.errors.UserError` saying where llcm looked and how to
fill the cache. A local folder spelled like an id wins over the id (:func:`llcm.pipeline.resolve_model`).
Records name a hub model by ``org/name@commit`` (:attr:`HubSnapshot.record`), never by its folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llcm.errors import UserError

DEFAULT_REVISION = "main"


@dataclass(frozen=True)
class HubSnapshot:
    repo_id: str  # org/name
    revision: str  # as asked: a branch, a tag or a commit ("main" when none was given)
    commit: str  # the commit that revision names in this cache
    folder: Path  # the snapshot folder: a diffusers model folder

    @property
    def record(self) -> str:
        """How saved records name this model: the id pinned to its commit, e.g. ``org/name@<40 hex>``."""
        return f"{self.repo_id}@{self.commit}"


def split_hub_id(spec: str | os.PathLike) -> tuple[str, str | None] | None:
    """``(repo_id, revision or None)`` when `spec` is spelled as a Hub model id ``org/name[@revision]``, else None.

    Only the spelling is checked (huggingface_hub's ``validate_repo_id``, and exactly one "/"): paths such as
    ``./x``, ``../x/y``, ``/abs/path`` or ``runs/x/model`` are not ids."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, at, revision = os.fspath(spec).partition("@")
    if (at and not revision.strip()) or repo_id.count("/") != 1:
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, revision or None


def hub_cache() -> Path:
    """The Hugging Face hub cache, from the environment as it is now: HF_HUB_CACHE (or its older name
    HUGGINGFACE_HUB_CACHE), else HF_HOME/hub, else huggingface_hub's default. huggingface_hub reads these
    once, when it is imported; reading them here keeps a change made since (a test, a notebook) in effect."""
    from huggingface_hub import constants

    env = os.environ
    root = (env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
            or (os.path.join(env["HF_HOME"], "hub") if env.get("HF_HOME") else constants.HF_HUB_CACHE))
    return Path(os.path.expandvars(os.path.expanduser(root)))


def find_snapshot(spec: str | os.PathLike) -> HubSnapshot | None:
    """The cached snapshot `spec` names, None when `spec` is not spelled as a Hub id; a UserError when it is one
    that the cache lacks (one line: the id, the revision, the cache folder, how to fill it)."""
    parsed = split_hub_id(spec)
    if parsed is None:
        return None
    repo_id, revision = parsed
    from huggingface_hub import snapshot_download

    cache = hub_cache()
    try:  # never the network: local_files_only whatever HF_HUB_OFFLINE says
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except (OSError, ValueError) as exc:  # LocalEntryNotFoundError, IncompleteSnapshotError, a bad revision
        raise UserError(_not_cached(os.fspath(spec), repo_id, revision, cache, exc)) from None
    return HubSnapshot(repo_id, revision or DEFAULT_REVISION, folder.name, folder)  # folder: snapshots/<commit>


def _not_cached(spec: str, repo_id: str, revision: str | None, cache: Path, exc: Exception) -> str:
    rev = revision or DEFAULT_REVISION
    have = cached_revisions(repo_id, cache)
    if type(exc).__name__ == "IncompleteSnapshotError":  # an interrupted download
        found = f"holds an incomplete snapshot of {repo_id} (revision {rev})"
    elif have:
        found = f"has {repo_id} but not revision {rev} (cached: {', '.join(have)})"
    else:
        found = f"has no {repo_id} (revision {rev})"
    fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    return (f"{spec} is not a local folder, and the Hugging Face cache {cache} {found}; llcm never "
            f"downloads, HF_HUB_OFFLINE or not: on a connected machine run `{fetch}` (older huggingface_hub: "
            "`huggingface-cli download`) and copy its cache here (HF_HUB_CACHE or HF_HOME), or pass a local folder")


def cached_revisions(repo_id: str, cache: Path | None = None) -> list[str]:
    """Each cached commit of `repo_id` (short), with the branches/tags naming it, as huggingface_hub's scan lists
    them: e.g. ``["main (0123456789ab)"]``."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(cache or hub_cache())
    except Exception:  # no cache folder, or one it cannot read: nothing cached
        return []
    return [f"{', '.join(sorted(rev.refs))} ({rev.commit_hash[:12]})" if rev.refs else rev.commit_hash[:12]
            for repo in info.repos if repo.repo_id == repo_id and repo.repo_type == "model"
            for rev in sorted(repo.revisions, key=lambda r: r.commit_hash)]
