"""Shared fixtures: tiny model folders (built once per session) and test images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
HYBRID = ("qwen3_5", "qwen3_5_moe")  # linear-attention layers beside full attention: no prefix cache, no step graphs
# The engine tests run on the CPU in CI; LOCALVL_TEST_DEVICE=cuda runs them on a GPU (fp32 still,
# so equality with the reference model holds).
TEST_DEVICE = os.environ.get("LOCALVL_TEST_DEVICE", "cpu")
if TEST_DEVICE.startswith("cuda"):
    import torch

    # cuDNN runs float32 convolutions in TF32 unless told not to (matmuls it leaves in float32): a
    # reference run on a model no engine has patched yet (an engine process's tests: that process
    # patches its own copy) would take the vision tower's Conv3d patch embedding ~1e-3 away from
    # the engine's float32 matmul of it (qwen_vl.patches_as_matmul), enough to flip a greedy token.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    """``model_dir(family, vocab="tiny")``: a tiny model folder, built on first request."""
    from localvl.models.tiny import build_tiny_model

    built: dict[tuple[str, str], Path] = {}

    def get(family: str = "qwen2_5_vl", vocab: str = "tiny") -> Path:
        key = (family, vocab)
        if key not in built:
            built[key] = build_tiny_model(tmp_path_factory.mktemp(f"{family}-{vocab}"), family, vocab)
        return built[key]

    return get


@pytest.fixture(scope="session")
def loaded_model(model_dir):
    """``loaded_model(family, vocab="tiny")``: a LoadedModel (fp32, CPU), loaded once."""
    from localvl.models.loader import load_model

    cache: dict[tuple[str, str], object] = {}

    def get(family: str = "qwen2_5_vl", vocab: str = "tiny"):
        key = (family, vocab)
        if key not in cache:
            cache[key] = load_model(str(model_dir(family, vocab)), device=TEST_DEVICE, dtype="float32")
        return cache[key]

    return get
