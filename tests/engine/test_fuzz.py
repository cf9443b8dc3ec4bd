"""The engine fuzzer (``fuzz.py``) on two seeds per family; run many more with
``python -m tests.engine.fuzz --family FAMILY --seeds 0:500 --keep-going``."""

import pytest
import torch

from tests.conftest import FAMILIES
from tests.engine.fuzz import Fuzzer

# Two seeds each, picked for cases that preempt and cancel (some mid-step) within a few seconds.
SEEDS = {
    "qwen2_vl": (1, 6),
    "qwen2_5_vl": (2, 5),
    "qwen3_vl": (2, 4),
    "qwen3_vl_moe": (4, 7),
    "qwen3_5": (1, 4),
    "qwen3_5_moe": (1, 6),
}


@pytest.fixture(scope="module")
def fuzzers(loaded_model):
    made: dict[str, Fuzzer] = {}
    # The tiny models' matrices are a few KB: a second thread only waits for the first (on a
    # busy 2-core runner, ten times slower). Put back after the module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def get(family: str) -> Fuzzer:
        if family not in made:
            made[family] = Fuzzer(loaded_model(family))
        return made[family]

    yield get
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family, seed", [(family, seed) for family in FAMILIES for seed in SEEDS[family]])
def test_random_schedules_keep_every_invariant(fuzzers, family, seed):
    result = fuzzers(family).run(seed)
    assert result.checks["no block, slot or queue place leaked at the end"] == 1
