"""The benchmarks run end to end on a small CPU configuration (what they measure is printed,
never asserted: timings do not belong in tests). This is what proves the GPU scripts work before
a GPU session spends its minutes on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from localvl.engine import cpu_decode

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, timeout: float = 240) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_the_load_benchmark_compares_engine_and_baseline(tmp_path):
    out = run("benchmarks/load.py", "--tokens", "8", "--requests", "4", "--concurrency", "1,2", "--baseline-requests", "1",
              "--single-requests", "1", "--vision-images", "2", "--json", str(tmp_path / "load.json"))
    assert "naive model.generate" in out and "concurrency 2 vs 1" in out
    result = json.loads((tmp_path / "load.json").read_text())
    assert result["output_tokens"] == 8 and result["prompt_tokens"] > 256  # one 448 px image is 256 tokens
    assert {row["concurrency"] for row in result["engine"]} == {1, 2}
    assert all(row["requests_per_s"] > 0 for row in result["engine"]) and result["baseline"]["requests_per_s"] > 0
    assert all(row["server_cpu_ms_per_request"] > 0 for row in result["engine"])  # the engine process's CPU too


def test_the_load_benchmark_times_steps_with_the_engine_in_process(tmp_path):
    out = run("benchmarks/load.py", "--tokens", "8", "--requests", "2", "--concurrency", "2", "--baseline-requests", "1",
              "--vision-images", "1", "--in-process", "--json", str(tmp_path / "load.json"))
    result = json.loads((tmp_path / "load.json").read_text())
    assert "server_ttft_p50_ms" in result["engine"][0] and result["decode_ms_per_step"] and "TTFT p50" in out


def test_the_load_benchmark_runs_a_hybrid_model_and_times_its_second_turn(tmp_path):
    out = run("benchmarks/load.py", "--family", "qwen3_5", "--tokens", "8", "--requests", "2", "--concurrency", "2",
              "--baseline-requests", "1", "--vision-images", "1", "--in-process", "--json", str(tmp_path / "load.json"))
    result = json.loads((tmp_path / "load.json").read_text())
    assert result["family"] == "qwen3_5" and "tiny qwen3_5 on" in out
    assert result["engine"][0]["requests_per_s"] > 0 and result["second_turn"]["server_ratio"] > 0


def test_the_step_profile_and_the_decode_split_run():
    assert "decode step median" in run("benchmarks/profile_step.py", "--batch", "2", "--tokens", "12")
    assert "engine-thread CPU per step" in run("benchmarks/decode_split.py")


def test_the_sampling_benchmark_runs_and_checks_batched_penalties_equal_row_by_row():
    assert "row by row" in run("benchmarks/sampling.py", "--batch", "3", "--vocab", "500", "--steps", "2")


@pytest.mark.skipif(cpu_decode._compiler() is None, reason="needs a C++ compiler (inductor)")
def test_the_compiled_start_makes_one_layer_graph_per_kind_of_step_whatever_the_depth():
    out = run("benchmarks/compile_start.py", "--layers", "3")
    assert "compiled=True; graphs made: 2" in out  # one token, several: not one pair per layer


@pytest.mark.skipif(cpu_decode._compiler() is None, reason="needs a C++ compiler")
def test_the_decode_attention_comparison_runs():
    out = run("benchmarks/decode_attention.py", "--rows", "3", "--context", "40", "--tokens", "6")
    assert "tiny shape" in out and "3b shape" in out and "decode step at batch 16" in out


def test_repeated_load_runs_are_summarised():
    out = run("benchmarks/repeat.py", "--runs", "2", "--", "--tokens", "4", "--requests", "2", "--concurrency", "2",
              "--baseline-requests", "2", timeout=400)
    assert out.count("run ") >= 2 and "concurrency 2, 2 runs: vs the baseline median" in out


def test_the_loading_check_loads_and_answers():
    out = run("benchmarks/loading_check.py")
    assert "auto dtype, auto attention: loaded" in out and "tokens through the engine" in out


def test_the_engine_alone_runs_beside_the_baseline():
    out = run("benchmarks/engine_only.py", "--requests", "2", "--concurrency", "2", "--tokens", "6", "--baseline-requests", "1",
              "--prerendered")
    assert "naive model.generate" in out and "engine alone, concurrency 2, prompts rendered beforehand" in out


def test_the_image_stall_benchmark_runs():
    out = run("benchmarks/image_stall.py", "--streams", "2", "--images", "3", "--image", "112", "--max-batch-tokens", "64")
    assert "its prefill:" in out and "all 3 images through the vision tower in one call" in out


def test_the_constrained_step_benchmark_runs_and_checks_both_unpackings_equal():
    assert "ratio" in run("benchmarks/constrained_step.py", "--rows", "2", "--repeats", "1")
