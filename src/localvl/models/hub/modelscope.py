"""ModelScope (the source that works from mainland China): its client's cache, resume and sha256
check, plus a record of finished pulls (its cache cannot tell a finished snapshot from an
interrupted one)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from localvl.models.hub.common import (
    HF_MIRROR_HINT,
    HubError,
    LocalModel,
    chain,
    first_line,
    hidden,
    is_network_error,
    model_type,
    root_cause,
)


MODELSCOPE_MISSING = (
    "downloading from ModelScope needs the modelscope package: pip install 'localvl[modelscope]' "
    "(or pip install modelscope)"
)


def cache_dir() -> Path:
    # modelscope's own default (MODELSCOPE_CACHE, else ~/.cache/modelscope); computed here so that
    # listing does not need the package.
    return Path(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope").expanduser()


def endpoint_url() -> str:
    return os.environ.get("MODELSCOPE_ENDPOINT") or "https://www.modelscope.cn"


def _ms_revision(revision: str | None) -> str:
    return revision or "master"


def _ms_record(repo_id: str, revision: str) -> Path:
    """localvl's note that a ModelScope pull finished (beside modelscope's cache, never inside a snapshot)."""
    return cache_dir() / "localvl-pulls" / f"{repo_id.replace('/', '--')}@{revision}.json"


def local_copy(repo_id: str, revision: str | None) -> Path | None:
    record = _ms_record(repo_id, _ms_revision(revision))
    if not record.is_file():
        # A folder an older modelscope client left, if its weights are whole: it names no revision,
        # so it stands in only where none was asked for.
        return next((f for f in _legacy_folders(repo_id) if weights_complete(f)), None) if revision is None else None
    path = Path(json.loads(record.read_text())["path"])
    return path if path.is_dir() else None


# Where older modelscope clients kept a model, under the cache root (modelscope's own
# ``find_reusable_legacy_repo_dir`` names them; 1.40's source checked): ``models/owner/name`` with
# the name's dots written "___", its default root's ``hub/models/...`` before the root moved up a
# level, ``hub/owner/name`` before the ``models`` level, and ``owner/name`` flat under a
# MODELSCOPE_CACHE.
_LEGACY_PARENTS = (("models",), ("hub", "models"), ("hub",), ())
_NOT_OWNERS = {"models", "hub", "datasets", "localvl-pulls"}


def _legacy_folders(repo_id: str) -> list[Path]:
    owner, name = repo_id.split("/", 1)
    root = cache_dir()
    folders = [root.joinpath(*parent, owner, n) for parent in _LEGACY_PARENTS for n in (name.replace(".", "___"), name)]
    return [f for f in folders if (f / "config.json").is_file()]


def _legacy_listing() -> list[tuple[str, Path]]:
    """(repo id, folder) of every model folder in an older client's layout."""
    root = cache_dir()
    found = []
    for parent in _LEGACY_PARENTS:
        base = root.joinpath(*parent)
        if not base.is_dir():
            continue
        for owner in sorted(base.iterdir()):
            # not the current layout's owner--name folders, nor a level named above
            skip = _NOT_OWNERS if not parent else {"models"} if parent == ("hub",) else set()
            if owner.name.startswith(".") or "--" in owner.name or owner.name in skip or not owner.is_dir():
                continue
            for folder in sorted(owner.iterdir()):
                if not folder.name.startswith(".") and (folder / "config.json").is_file():
                    found.append((f"{owner.name}/{folder.name.replace('___', '.')}", folder))
    return found


def weights_complete(folder: Path) -> bool:
    """Whether every weight file the folder's index names (or its one weight file) is there."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            return False
        return all((folder / shard).is_file() for shard in shards)
    return (folder / "model.safetensors").is_file()


def pull(repo_id: str, revision: str | None) -> Path:
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError:
        raise HubError(MODELSCOPE_MISSING) from None
    rev = _ms_revision(revision)
    cache = cache_dir()
    try:
        path = Path(snapshot_download(repo_id, revision=rev, cache_dir=str(cache), endpoint=endpoint_url()))
    except Exception as error:
        raise HubError(_ms_failure(repo_id, error)) from error
    record = _ms_record(repo_id, rev)
    record.parent.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and not hidden(p, path))
    record.write_text(json.dumps({"repo_id": repo_id, "revision": rev, "path": str(path), "files": files,
                                  "pulled_at": time.time(), "endpoint": endpoint_url()}))
    return path


def _ms_failure(repo_id: str, error: BaseException) -> str:
    where = endpoint_url() + (" (MODELSCOPE_ENDPOINT)" if os.environ.get("MODELSCOPE_ENDPOINT") else "")
    names = {type(e).__name__ for e in chain(error)}
    status = next((getattr(getattr(e, "response", None), "status_code", None) for e in chain(error)
                   if getattr(getattr(e, "response", None), "status_code", None)), None)
    if "NotExistError" in names or status == 404:
        return f"{repo_id} was not found on ModelScope ({where}). Check the spelling, e.g. Qwen/Qwen2.5-VL-7B-Instruct."
    if {"AuthenticationError", "PermissionDeniedError"} & names or status in (401, 403):
        return (
            f"ModelScope ({where}) refused access to {repo_id}: log in (`modelscope login`, or set "
            "MODELSCOPE_API_TOKEN) with an account that may read it."
        )
    if "FileIntegrityError" in names or "FileSizeMismatchError" in names:
        return (
            f"a file of {repo_id} from ModelScope failed its size or sha256 check and was not kept: "
            f"{first_line(root_cause(error))} Run the pull again."
        )
    if is_network_error(error) or "NetworkError" in names:
        cause = root_cause(error)
        return (
            f"could not reach ModelScope ({where}) to download {repo_id} ({type(cause).__name__}: "
            f"{first_line(cause)}). Check the network, or try the Hugging Face hub or a mirror "
            f"({HF_MIRROR_HINT}); a rerun resumes where this one stopped."
        )
    return f"downloading {repo_id} from ModelScope ({where}) failed: {type(error).__name__}: {first_line(error)}"


def list_local() -> list[LocalModel]:
    root = cache_dir()
    found = []
    for snapshot in sorted(root.glob("models/*/snapshots/*")):
        if not snapshot.is_dir():
            continue
        repo_id = snapshot.parent.parent.name.replace("--", "/", 1)
        files = [p for p in snapshot.rglob("*") if p.is_file() and not hidden(p, snapshot)]
        found.append(
            LocalModel(
                "modelscope", repo_id, snapshot.name, snapshot, sum(p.stat().st_size for p in files), (),
                model_type(snapshot), local_copy(repo_id, snapshot.name) == snapshot,
            )
        )
    for repo_id, folder in _legacy_listing():
        files = [p for p in folder.rglob("*") if p.is_file() and not hidden(p, folder)]
        found.append(LocalModel("modelscope", repo_id, "", folder, sum(p.stat().st_size for p in files), (),
                                model_type(folder), weights_complete(folder)))
    return found
