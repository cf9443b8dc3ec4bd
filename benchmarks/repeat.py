"""Run ``load.py`` several times and summarise its ratios: on a noisy machine one run is an anecdote.

Each run starts its own server and engine and takes its own pooled baseline (half before the
engine, half after), so the runs are independent draws of the machine's drift. Prints every run,
then per concurrency level the median, mean and range of the ratio and of requests/s.

    python benchmarks/repeat.py --runs 5 -- --tokens 128 --requests 400 --baseline-requests 24 --concurrency 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("load_args", nargs=argparse.REMAINDER, help="arguments for load.py, after --")
    args = parser.parse_args()
    load_args = args.load_args[1:] if args.load_args[:1] == ["--"] else args.load_args
    ratios: dict[int, list[float]] = {}
    rates: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            out = Path(tmp) / f"run{run}.json"
            done = subprocess.run([sys.executable, str(HERE / "load.py"), *load_args, "--json", str(out)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"load.py failed (status {done.returncode}):\n{done.stderr[-3000:]}")
            result = json.loads(out.read_text())
            shown = []
            for row in result["engine"]:
                level = row["concurrency"]
                ratios.setdefault(level, []).append(row["vs_baseline"])
                rates.setdefault(level, []).append(row["requests_per_s"])
                shown.append(f"concurrency {level}: {row['requests_per_s']:.2f} req/s, {row['vs_baseline']:.2f}x")
            print(f"run {run + 1}: baseline {result['baseline']['requests_per_s']:.3f} req/s; " + "; ".join(shown), flush=True)
    for level in sorted(ratios):
        r, q = ratios[level], rates[level]
        print(f"concurrency {level}, {len(r)} runs: vs the baseline median {statistics.median(r):.2f}x, mean "
              f"{statistics.mean(r):.2f}x, range {min(r):.2f}-{max(r):.2f}x; requests/s median {statistics.median(q):.2f}, "
              f"range {min(q):.2f}-{max(q):.2f}")


if __name__ == "__main__":
    main()
