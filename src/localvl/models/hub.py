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

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

Source = Literal["huggingface", "modelscope"]
SOURCES: tuple[Source, ...] = ("huggingface", "modelscope")
HF_MIRROR_HINT = "HF_ENDPOINT=https://hf-mirror.com"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(RuntimeError):
    """A model could not be found or downloaded; the message says what was tried and what to do."""


@dataclass(frozen=True)
class LocalModel:
    """A model folder in one of the hubs' caches."""

    source: Source
    repo_id: str
    revision: str  # the commit (Hugging Face) or the revision asked for (ModelScope)
    path: Path
    size: int  # bytes of the files the folder holds
    refs: tuple[str, ...] = ()  # branch/tag names pointing at this revision
    model_type: str | None = None  # from config.json
    complete: bool = True


def is_hub_id(model: str) -> bool:
    """``owner/name`` that is not an existing path."""
    return bool(_HUB_ID.match(model)) and not os.path.exists(model)


# ----------------------------------------------------------------------------- progress


def progress_class() -> type:
    """A tqdm class writing to stderr whether or not it is a terminal.

    The hubs' clients hide their bars when stderr is not a terminal; a pull started by systemd or
    piped into a log should still show it is moving, so off a terminal the bar redraws rarely.
    """
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()

    class Progress(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)  # huggingface_hub's own bars take a name; vanilla tqdm refuses it
            kwargs["disable"] = kwargs.get("disable") is True or bool(os.environ.get("LOCALVL_NO_PROGRESS"))
            kwargs.setdefault("file", sys.stderr)
            kwargs.setdefault("mininterval", 0.1 if interactive else 5.0)
            super().__init__(*args, **kwargs)

    return Progress


# ----------------------------------------------------------------------------- Hugging Face


def _hf_endpoint() -> str:
    # Read at call time: huggingface_hub reads HF_ENDPOINT once, at import.
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _hf_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return constants.is_offline_mode() if value is None else value.upper() in ("1", "ON", "YES", "TRUE")


def hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def _hf_local(repo_id: str, revision: str | None) -> Path | None:
    """The complete cached snapshot (the client checks it against its cached file listing)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=hf_cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, IncompleteSnapshotError, FileNotFoundError):
        return None


def _hf_pull(repo_id: str, revision: str | None, verify: bool) -> Path:
    from huggingface_hub import snapshot_download

    endpoint = _hf_endpoint()
    try:
        path = Path(
            snapshot_download(
                repo_id, revision=revision, endpoint=endpoint, cache_dir=hf_cache_dir(), tqdm_class=progress_class()
            )
        )
    except Exception as error:  # the client's errors, mapped to what to do
        raise HubError(_hf_failure(repo_id, endpoint, error)) from error
    _hf_verify(repo_id, path, endpoint, hashes=verify)
    return path


def _hf_failure(repo_id: str, endpoint: str, error: BaseException) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{endpoint}" + (" (HF_ENDPOINT)" if os.environ.get("HF_ENDPOINT") else "")
    if isinstance(error, GatedRepoError):
        return (
            f"{repo_id} is gated on {where}: accept its licence on the model's page, then log in "
            "(`hf auth login`, or set HF_TOKEN) and pull again."
        )
    if isinstance(error, RevisionNotFoundError):
        return f"{repo_id} on {where} has no such revision: check --revision."
    if isinstance(error, RepositoryNotFoundError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        private = " If it is private, log in (`hf auth login`, or set HF_TOKEN)." if status == 401 else ""
        return (
            f"{repo_id} was not found on {where} (HTTP {status or 404}). Check the spelling, e.g. "
            f"Qwen/Qwen2.5-VL-7B-Instruct.{private}"
        )
    if isinstance(error, (LocalEntryNotFoundError, IncompleteSnapshotError)) or _is_network_error(error):
        cause = _root_cause(error)
        return (
            f"could not reach {where} to download {repo_id} ({type(cause).__name__}: {_first_line(cause)}). "
            f"Check the network; behind a firewall use a mirror ({HF_MIRROR_HINT}) or ModelScope "
            "(--source modelscope); or give --model a local folder."
        )
    if isinstance(error, OSError) and "Consistency check failed" in str(error):
        return (
            f"a file of {repo_id} arrived with the wrong size from {where}: {_first_line(error)} "
            "Nothing wrong was kept; run the pull again."
        )
    if isinstance(error, HfHubHTTPError):
        return f"downloading {repo_id} from {where} failed: {_first_line(error)}"
    return f"downloading {repo_id} from {where} failed: {type(error).__name__}: {_first_line(error)}"


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    _feed(digest, path)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    _feed(digest, path)
    return digest.hexdigest()


def _feed(digest: Any, path: Path, progress: Any = None) -> None:
    with path.open("rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
            if progress is not None:
                progress.update(len(block))


def _hf_verify(repo_id: str, snapshot: Path, endpoint: str, *, hashes: bool) -> None:
    """Check every file against the hub's listing: size, and sha256 (LFS) or git blob hash.

    A file that fails is deleted (its cache blob too), so the next pull fetches it again rather
    than trust it.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    commit = snapshot.name
    try:
        entries = [
            entry
            for entry in HfApi(endpoint=endpoint).list_repo_tree(repo_id, revision=commit, recursive=True)
            if isinstance(entry, RepoFile)
        ]
    except Exception as error:
        raise HubError(f"could not list {repo_id}'s files on {endpoint} to verify them: {_first_line(error)}") from error
    bad: list[str] = []
    total = sum(entry.size for entry in entries) if hashes else 0
    with progress_class()(total=total, unit="B", unit_scale=True, desc="Verifying", disable=not hashes) as bar:
        for entry in entries:
            local = snapshot / entry.path
            expected_size = entry.lfs.size if entry.lfs is not None else entry.size
            problem = None
            if not local.is_file():
                problem = "missing"
            elif local.stat().st_size != expected_size:
                problem = f"{local.stat().st_size} bytes, the hub lists {expected_size}"
            elif hashes:
                if entry.lfs is not None:
                    actual = _sha256(local)
                    if actual != entry.lfs.sha256:
                        problem = f"sha256 {actual[:12]}…, the hub lists {entry.lfs.sha256[:12]}…"
                elif entry.blob_id and _git_blob_sha1(local) != entry.blob_id:
                    problem = "its git hash differs from the hub's"
                bar.update(entry.size)
            if problem:
                bad.append(f"{entry.path} ({problem})")
                _discard(local)
    if bad:
        raise HubError(
            f"{len(bad)} file(s) of {repo_id} failed verification and were deleted: {'; '.join(bad)}. "
            "Run the pull again to fetch them anew."
        )


def _discard(link: Path) -> None:
    """Remove a cached file and the blob it points to."""
    target = link.resolve() if link.is_symlink() else None
    link.unlink(missing_ok=True)
    if target is not None:
        target.unlink(missing_ok=True)


def _hf_list() -> list[LocalModel]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(hf_cache_dir())
    except CacheNotFound:
        return []
    found = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            found.append(
                LocalModel(
                    "huggingface", repo.repo_id, rev.commit_hash, Path(rev.snapshot_path), rev.size_on_disk,
                    tuple(sorted(rev.refs)), _model_type(Path(rev.snapshot_path)),
                    _hf_local(repo.repo_id, rev.commit_hash) is not None,
                )
            )
    return found


# ----------------------------------------------------------------------------- ModelScope

MODELSCOPE_MISSING = (
    "downloading from ModelScope needs the modelscope package: pip install 'localvl[modelscope]' "
    "(or pip install modelscope)"
)


def modelscope_cache_dir() -> Path:
    # modelscope's own default (MODELSCOPE_CACHE, else ~/.cache/modelscope); computed here so that
    # listing does not need the package.
    return Path(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope").expanduser()


def _ms_endpoint() -> str:
    return os.environ.get("MODELSCOPE_ENDPOINT") or "https://www.modelscope.cn"


def _ms_revision(revision: str | None) -> str:
    return revision or "master"


def _ms_record(repo_id: str, revision: str) -> Path:
    """localvl's note that a ModelScope pull finished (beside modelscope's cache, never inside a snapshot)."""
    return modelscope_cache_dir() / "localvl-pulls" / f"{repo_id.replace('/', '--')}@{revision}.json"


def _ms_local(repo_id: str, revision: str | None) -> Path | None:
    record = _ms_record(repo_id, _ms_revision(revision))
    if not record.is_file():
        return None
    path = Path(json.loads(record.read_text())["path"])
    return path if path.is_dir() else None


def _ms_pull(repo_id: str, revision: str | None) -> Path:
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError:
        raise HubError(MODELSCOPE_MISSING) from None
    rev = _ms_revision(revision)
    cache = modelscope_cache_dir()
    try:
        path = Path(snapshot_download(repo_id, revision=rev, cache_dir=str(cache), endpoint=_ms_endpoint()))
    except Exception as error:
        raise HubError(_ms_failure(repo_id, error)) from error
    record = _ms_record(repo_id, rev)
    record.parent.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
    record.write_text(json.dumps({"repo_id": repo_id, "revision": rev, "path": str(path), "files": files,
                                  "pulled_at": time.time(), "endpoint": _ms_endpoint()}))
    return path


def _ms_failure(repo_id: str, error: BaseException) -> str:
    where = _ms_endpoint() + (" (MODELSCOPE_ENDPOINT)" if os.environ.get("MODELSCOPE_ENDPOINT") else "")
    names = {type(e).__name__ for e in _chain(error)}
    status = next((getattr(getattr(e, "response", None), "status_code", None) for e in _chain(error)
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
            f"{_first_line(_root_cause(error))} Run the pull again."
        )
    if _is_network_error(error) or "NetworkError" in names:
        cause = _root_cause(error)
        return (
            f"could not reach ModelScope ({where}) to download {repo_id} ({type(cause).__name__}: "
            f"{_first_line(cause)}). Check the network, or try the Hugging Face hub or a mirror "
            f"({HF_MIRROR_HINT}); a rerun resumes where this one stopped."
        )
    return f"downloading {repo_id} from ModelScope ({where}) failed: {type(error).__name__}: {_first_line(error)}"


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _ms_list() -> list[LocalModel]:
    root = modelscope_cache_dir()
    found = []
    for snapshot in sorted(root.glob("models/*/snapshots/*")):
        if not snapshot.is_dir():
            continue
        repo_id = snapshot.parent.parent.name.replace("--", "/", 1)
        files = [p for p in snapshot.rglob("*") if p.is_file() and not _hidden(p, snapshot)]
        found.append(
            LocalModel(
                "modelscope", repo_id, snapshot.name, snapshot, sum(p.stat().st_size for p in files), (),
                _model_type(snapshot), _ms_local(repo_id, snapshot.name) == snapshot,
            )
        )
    return found


# ----------------------------------------------------------------------------- both


def local_copy(repo_id: str, source: Source = "huggingface", revision: str | None = None) -> Path | None:
    """The complete local copy of a hub model, or None. Never touches the network."""
    return _hf_local(repo_id, revision) if source == "huggingface" else _ms_local(repo_id, revision)


def pull(repo_id: str, source: Source = "huggingface", revision: str | None = None, *, verify: bool = True) -> Path:
    """Download (or complete) a model folder and return where it lives."""
    if source not in SOURCES:
        raise HubError(f"unknown source {source!r}: one of {', '.join(SOURCES)}")
    if not _HUB_ID.match(repo_id):
        raise HubError(f"{repo_id!r} is not a hub id (owner/name, e.g. Qwen/Qwen2.5-VL-7B-Instruct)")
    if source == "huggingface":
        if _hf_offline():
            raise HubError(
                f"cannot download {repo_id}: HF_HUB_OFFLINE is set. Unset it (or run `localvl pull {repo_id}` "
                "where the network is reachable)."
            )
        return _hf_pull(repo_id, revision, verify)
    return _ms_pull(repo_id, revision)


def resolve_model(model: str, source: Source = "huggingface", revision: str | None = None, *, download: bool = True) -> Path:
    """A ``--model`` value → a local folder: the folder itself, the cached copy, or a fresh pull."""
    if os.path.isdir(model):
        return Path(model)
    if not _HUB_ID.match(model):
        raise HubError(
            f"{model!r} is neither a folder nor a hub id (owner/name, e.g. Qwen/Qwen2.5-VL-7B-Instruct)"
        )
    found = local_copy(model, source, revision)
    if found is not None:
        return found
    cache = hf_cache_dir() if source == "huggingface" else modelscope_cache_dir()
    flag = f" --source {source}" if source != "huggingface" else ""
    rev = f" --revision {revision}" if revision else ""
    offline = source == "huggingface" and _hf_offline()
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
    return _hf_list() + _ms_list()


def _source_name(source: Source) -> str:
    return f"the Hugging Face hub ({_hf_endpoint()})" if source == "huggingface" else f"ModelScope ({_ms_endpoint()})"


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _chain(error: BaseException) -> Iterable[BaseException]:
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _root_cause(error: BaseException) -> BaseException:
    *_, last = _chain(error)
    return last


def _is_network_error(error: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(error)}
    network = {"ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "ConnectionError",
               "ConnectionRefusedError", "NameResolutionError", "OfflineModeIsEnabled", "RemoteProtocolError"}
    return bool(names & network) or any(isinstance(e, (ConnectionError, TimeoutError)) for e in _chain(error))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
