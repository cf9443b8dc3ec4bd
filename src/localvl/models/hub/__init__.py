"""Model folders from the Hugging Face hub or ModelScope: find the local copy, pull, list.

The downloading itself is the hubs' own clients' (``huggingface_hub.snapshot_download``,
``modelscope``'s ``snapshot_download``): their caches, resume, mirrors (``HF_ENDPOINT``,
``MODELSCOPE_ENDPOINT``) and tokens work as users know them. What localvl adds: one progress bar
that also shows when stderr is not a terminal, sha256/git-hash verification of Hugging Face files
(the client checks sizes only; ModelScope's checks sha256 itself), a record of completed ModelScope
pulls (its cache cannot tell a finished snapshot from an interrupted one), and messages that say
what was tried and what to do. Nothing here imports torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from localvl.models.hub import huggingface, modelscope
from localvl.models.hub.common import HF_MIRROR_HINT, HUB_ID, SOURCES, HubError, LocalModel, Source, is_hub_id

__all__ = ["SOURCES", "HubError", "LocalModel", "Source", "is_hub_id", "list_local", "local_copy", "pull", "resolve_model"]


def local_copy(repo_id: str, source: Source = "huggingface", revision: str | None = None) -> Path | None:
    """The complete local copy of a hub model, or None. Never touches the network."""
    if source == "huggingface":
        return huggingface.local_copy(repo_id, revision)
    return modelscope.local_copy(repo_id, revision)


def pull(repo_id: str, source: Source = "huggingface", revision: str | None = None, *, verify: bool = True) -> Path:
    """Download (or complete) a model folder and return where it lives."""
    if source not in SOURCES:
        raise HubError(f"unknown source {source!r}: one of {', '.join(SOURCES)}")
    if not HUB_ID.match(repo_id):
        raise HubError(f"{repo_id!r} is not a hub id (owner/name, e.g. Qwen/Qwen2.5-VL-7B-Instruct)")
    if source == "huggingface":
        if huggingface.offline():
            raise HubError(
                f"cannot download {repo_id}: HF_HUB_OFFLINE is set. Unset it (or run `localvl pull {repo_id}` "
                "where the network is reachable)."
            )
        return huggingface.pull(repo_id, revision, verify)
    return modelscope.pull(repo_id, revision)


def resolve_model(model: str, source: Source = "huggingface", revision: str | None = None, *, download: bool = True) -> Path:
    """A ``--model`` value → a local folder: the folder itself, the cached copy, or a fresh pull."""
    if os.path.isdir(model):
        return Path(model)
    if not HUB_ID.match(model):
        raise HubError(
            f"{model!r} is neither a folder nor a hub id (owner/name, e.g. Qwen/Qwen2.5-VL-7B-Instruct)"
        )
    found = local_copy(model, source, revision)
    if found is not None:
        return found
    cache = huggingface.cache_dir() if source == "huggingface" else modelscope.cache_dir()
    flag = f" --source {source}" if source != "huggingface" else ""
    rev = f" --revision {revision}" if revision else ""
    offline = source == "huggingface" and huggingface.offline()
    if not download or offline:
        why = "HF_HUB_OFFLINE is set" if offline else "downloading is off"
        raise HubError(
            f"{model} is not on this machine (looked in {cache}) and {why}. Pull it first where the network "
            f"is reachable: `localvl pull {model}{flag}{rev}` (a mirror: {HF_MIRROR_HINT}; from mainland China: "
            "--source modelscope), or give --model a local folder."
        )
    print(f"localvl: {model} is not on this machine; pulling it from {_source_name(source)}", file=sys.stderr,
          flush=True)
    try:
        return pull(model, source, revision)
    except HubError as error:
        raise HubError(
            f"{model} is not on this machine (looked in {cache}) and could not be downloaded: {error}"
        ) from error


def list_local() -> list[LocalModel]:
    """Every model folder in the Hugging Face and ModelScope caches."""
    return huggingface.list_local() + modelscope.list_local()


def _source_name(source: Source) -> str:
    if source == "huggingface":
        return f"the Hugging Face hub ({huggingface.endpoint_url()})"
    return f"ModelScope ({modelscope.endpoint_url()})"

