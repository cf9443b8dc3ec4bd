"""What both hubs share: the error, a local model's description, hub ids, the progress bar, and
reading the hubs' clients' errors."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

Source = Literal["huggingface", "modelscope"]
SOURCES: tuple[Source, ...] = ("huggingface", "modelscope")
HF_MIRROR_HINT = "HF_ENDPOINT=https://hf-mirror.com"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
    return bool(HUB_ID.match(model)) and not os.path.exists(model)


def snapshot_repo_id(folder: Path) -> str | None:
    """The hub id of a folder that is a snapshot in a hub's cache (``models--Qwen--Qwen2.5-VL-3B-Instruct/
    snapshots/<commit>``; ModelScope's ``models/Qwen--Qwen2.5-VL-3B-Instruct/snapshots/<revision>``), else None."""
    folder = Path(folder).absolute()
    if folder.parent.name != "snapshots":
        return None
    owner, sep, name = folder.parent.parent.name.removeprefix("models--").partition("--")
    return f"{owner}/{name}" if sep and owner and name else None


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



def hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def chain(error: BaseException) -> Iterable[BaseException]:
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def root_cause(error: BaseException) -> BaseException:
    *_, last = chain(error)
    return last


def is_network_error(error: BaseException) -> bool:
    names = {type(e).__name__ for e in chain(error)}
    network = {"ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "ConnectionError",
               "ConnectionRefusedError", "NameResolutionError", "OfflineModeIsEnabled", "RemoteProtocolError"}
    return bool(names & network) or any(isinstance(e, (ConnectionError, TimeoutError)) for e in chain(error))


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

