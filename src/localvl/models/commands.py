"""``localvl pull`` and ``localvl models`` (import-light: no torch, the hub clients only when run)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from localvl.models.hub import SOURCES


def add_parser(sub: Any) -> None:
    pull = sub.add_parser(
        "pull",
        help="download a model from the Hugging Face hub or ModelScope",
        description="Downloads (or completes: an interrupted pull resumes) a model folder into the hub's "
        "own cache, verifies it, and prints where it lives. HF_ENDPOINT selects a Hugging Face mirror "
        "(e.g. https://hf-mirror.com), MODELSCOPE_ENDPOINT a ModelScope site; HF_TOKEN / "
        "MODELSCOPE_API_TOKEN log in.",
    )
    pull.add_argument("model", help="hub id, e.g. Qwen/Qwen2.5-VL-7B-Instruct")
    pull.add_argument("--source", choices=SOURCES, default="huggingface",
                      help="where from (default huggingface; modelscope works from mainland China)")
    pull.add_argument("--revision", help="branch, tag or commit (default: main, or master on ModelScope)")
    pull.add_argument("--no-verify", dest="verify", action="store_false",
                      help="skip hashing Hugging Face files (their sizes are still checked)")
    pull.set_defaults(run=run_pull)

    models = sub.add_parser("models", help="list the models on disk (Hugging Face and ModelScope caches)")
    models.add_argument("--json", action="store_true", help="one JSON object per model")
    models.set_defaults(run=run_models)


def run_pull(args: argparse.Namespace) -> int:
    from localvl.models.hub import HubError, pull

    try:
        path = pull(args.model, args.source, args.revision, verify=args.verify)
    except HubError as error:
        print(f"localvl pull: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nlocalvl pull: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(path)
    return 0


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"  # pragma: no cover


def run_models(args: argparse.Namespace) -> int:
    import json

    from localvl.models.hub import list_local

    found = list_local()
    if args.json:
        for m in found:
            print(json.dumps({"source": m.source, "model": m.repo_id, "revision": m.revision, "refs": list(m.refs),
                              "size": m.size, "model_type": m.model_type, "complete": m.complete,
                              "path": str(m.path)}))
        return 0
    if not found:
        print("no models on disk; get one with: localvl pull Qwen/Qwen2.5-VL-3B-Instruct", file=sys.stderr)
        return 0
    rows = [("SOURCE", "MODEL", "REVISION", "SIZE", "TYPE", "PATH")]
    for m in found:
        revision = (m.revision[:12] or "-") + (f" ({', '.join(m.refs)})" if m.refs else "")
        kind = (m.model_type or "?") + ("" if m.complete else ", incomplete")
        rows.append((m.source, m.repo_id, revision, human_size(m.size), kind, str(m.path)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0
