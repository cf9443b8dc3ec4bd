"""The Hugging Face hub: its client's cache and resume, plus a hash check of every file (the
client checks sizes only) and messages that say what was tried and what to do."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from localvl.models.hub.common import (
    HF_MIRROR_HINT,
    HubError,
    LocalModel,
    first_line,
    is_network_error,
    model_type,
    progress_class,
    root_cause,
)


def endpoint_url() -> str:
    # Read at call time: huggingface_hub reads HF_ENDPOINT once, at import.
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return constants.is_offline_mode() if value is None else value.upper() in ("1", "ON", "YES", "TRUE")


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def local_copy(repo_id: str, revision: str | None) -> Path | None:
    """The complete cached snapshot (the client checks it against its cached file listing)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, IncompleteSnapshotError, FileNotFoundError):
        return None


def pull(repo_id: str, revision: str | None, verify: bool) -> Path:
    from huggingface_hub import snapshot_download

    endpoint = endpoint_url()
    try:
        path = Path(
            snapshot_download(
                repo_id, revision=revision, endpoint=endpoint, cache_dir=cache_dir(), tqdm_class=progress_class()
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
    if isinstance(error, (LocalEntryNotFoundError, IncompleteSnapshotError)) or is_network_error(error):
        cause = root_cause(error)
        return (
            f"could not reach {where} to download {repo_id} ({type(cause).__name__}: {first_line(cause)}). "
            f"Check the network; behind a firewall use a mirror ({HF_MIRROR_HINT}) or ModelScope "
            "(--source modelscope); or give --model a local folder."
        )
    if isinstance(error, OSError) and "Consistency check failed" in str(error):
        return (
            f"a file of {repo_id} arrived with the wrong size from {where}: {first_line(error)} "
            "Nothing wrong was kept; run the pull again."
        )
    if isinstance(error, HfHubHTTPError):
        return f"downloading {repo_id} from {where} failed: {first_line(error)}"
    return f"downloading {repo_id} from {where} failed: {type(error).__name__}: {first_line(error)}"


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
        raise HubError(f"could not list {repo_id}'s files on {endpoint} to verify them: {first_line(error)}") from error
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


def list_local() -> list[LocalModel]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir())
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
                    tuple(sorted(rev.refs)), model_type(Path(rev.snapshot_path)),
                    local_copy(repo.repo_id, rev.commit_hash) is not None,
                )
            )
    return found

