"""Splitting the cores between the engine process and the server process."""

import os

import pytest

from localvl.engine.affinity import available, pin_process, split


def test_the_engine_takes_all_cores_but_the_last_by_default():
    assert split([3, 0, 2, 1], None) == ([0, 1, 2], [3])
    assert split([0, 1], None) == ([0], [1])


def test_the_engine_takes_as_many_cores_as_it_has_threads():
    assert split(range(8), 2) == ([0, 1], [2, 3, 4, 5, 6, 7])


def test_threads_asking_for_every_core_get_them_unsplit():
    assert split(range(4), 4) is None
    assert split(range(4), 16) is None


def test_one_core_is_not_split():
    assert split([5], None) is None
    assert split([], 1) is None


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(available()) < 2, reason="needs two cores and Linux")
def test_pinning_reaches_threads_already_running_and_can_be_undone():
    import threading

    before = available()
    seen: list[set[int]] = []
    go = threading.Event()

    def worker() -> None:
        go.wait(10)
        seen.append(os.sched_getaffinity(0))

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        pin_process(before[-1:])
        go.set()
        thread.join(10)
        assert seen == [{before[-1]}] and available() == before[-1:]
    finally:
        pin_process(before)
    assert available() == before
