"""The built-in demo model: a tiny random Qwen2.5-VL, built on first use and cached."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from localvl.models.tiny import build_tiny_model, default_cache_dir

DEMO_FAMILY = "qwen2_5_vl"
DEMO_VERSION = 1  # bump when the tiny builder changes what it writes

BANNER = """
================================================================================
  localvl is serving its built-in DEMO model: a tiny Qwen2.5-VL with RANDOM
  weights. Every answer it gives is gibberish. It exists so that you can try
  the API, the SDKs and your own code without downloading anything.

  To serve a real model, name it (a hub id or a local folder):
      localvl serve --model Qwen/Qwen2.5-VL-3B-Instruct
================================================================================
"""


def demo_model_path(cache_dir: Path | None = None) -> Path:
    """The demo model's folder, building it (atomically, so concurrent starts are safe) if missing."""
    target = (cache_dir or default_cache_dir()) / f"demo-{DEMO_FAMILY}-v{DEMO_VERSION}"
    if (target / "localvl-tiny.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        build_tiny_model(staging, DEMO_FAMILY, "tiny", seed=0, cache_dir=cache_dir)
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first
            if not (target / "localvl-tiny.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
