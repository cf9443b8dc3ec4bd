"""The API fuzzer (``fuzz_requests.py``) on a few dozen seeds per family; run many more with
``python -m tests.api.fuzz_requests --seeds 0:2000 --keep-going`` (``--family qwen3_5`` too)."""

import asyncio

import pytest
import torch

from tests.api.fuzz_requests import ApiFuzzer

# Chunks of consecutive seeds: every route, valid and mutated requests, follow-ups and repeats.
CHUNKS = {"qwen2_5_vl": [(0, 20), (20, 40)], "qwen3_5": [(600, 630)]}


@pytest.fixture(scope="module")
def fuzzers(loaded_model, tmp_path_factory):
    loop = asyncio.new_event_loop()
    made: dict[str, ApiFuzzer] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models' matrices: a second thread only waits

    def get(family: str) -> ApiFuzzer:
        if family not in made:
            made[family] = ApiFuzzer(loaded_model(family), tmp_path_factory.mktemp(f"apifuzz-{family}"))
            loop.run_until_complete(made[family].start())
        return made[family]

    yield loop, get
    for fuzzer in made.values():
        loop.run_until_complete(fuzzer.stop())
    loop.close()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family, seeds", [(family, seeds) for family, chunks in CHUNKS.items() for seeds in chunks])
def test_every_answer_is_well_formed_or_an_error_in_the_envelope(fuzzers, family, seeds):
    loop, get = fuzzers
    fuzzer = get(family)
    failures = []
    for seed in range(*seeds):
        result = loop.run_until_complete(fuzzer.run(seed))
        failures += [f"seed {seed}: {failure}" for failure in result.failures]
    failures += loop.run_until_complete(fuzzer.finish_batches())
    assert not failures, "\n".join(failures)
