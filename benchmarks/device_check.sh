#!/usr/bin/env bash
# One GPU session's checks, in the order that matters, inside one device call: every step's timeout
# is cut to what is left of TOTAL_S (default 540 s, under the device tool's 600 s per command), and
# a step with under 20 s left is skipped, so the output of the steps that ran always comes back.
# Output under $OUT (or ./device-out). Usage on a bare device machine (see docs/PERFORMANCE.md):
#   bash benchmarks/device_check.sh
# ONLY="name ..." runs just those steps (e.g. a second call for the steps the first one skipped: on
# the same warm machine, ONLY="$(cat /tmp/device-skipped)").
set -u
# Every step's output goes to $out/raw; at the end it is packed into $out/results.tgz (the device
# tool returns at most 8 files).
dest=${OUT:-device-out}
out=$dest/raw
mkdir -p "$out"
deadline=$((SECONDS + ${TOTAL_S:-540}))
rm -f /tmp/device-skipped
# step NAME SECONDS COMMAND...: run COMMAND with at most SECONDS, or what is left before the deadline.
step() {
  local name=$1 want=$2 left=$((deadline - SECONDS))
  shift 2
  if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then return; fi
  if (( left < 20 )); then echo "skipped $name: ${left}s left" | tee -a "$out/skipped.txt"; echo "$name" >>/tmp/device-skipped; return; fi
  timeout "$(( want < left ? want : left ))" "$@"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
# In the server's process, where its steps can be timed: every issue #3 GPU target in one run.
step load "${LOAD_S:-220}" python3 benchmarks/load.py --shape 3b --device cuda --concurrency 1,16,64 --requests 64 \
  --single-requests 8 --baseline-requests 2 --tokens 128 --in-process --json "$out/load.json" 2>&1 | grep -v -E "Loading|Writing" | tee "$out/load.txt"
# The engine tests on CUDA, four workers sharing the card (pytest-xdist is on the device image; the
# tests are fp32 tiny models, so launches, not the card, bound them); the whole log comes back in
# results.tgz, one line per test as it ends (-v), so a step cut off by its timeout still names its failures.
step tests "${TESTS_S:-200}" env LOCALVL_TEST_DEVICE=cuda python3 -m pytest -v -rfE -n "${TEST_WORKERS:-4}" -p no:cacheprovider \
  tests/engine tests/models/test_patches.py tests/models/test_loading.py -k "not compiled" > "$out/tests-full.txt" 2>&1
grep -E "(FAILED|ERROR) " "$out/tests-full.txt" | sort -u | head -60 | tee "$out/tests.txt"
tail -3 "$out/tests-full.txt" | tee -a "$out/tests.txt"
# As `localvl serve` runs it: the engine in a process of its own, at 64 concurrent.
step load-process "${LOAD_PROCESS_S:-120}" python3 benchmarks/load.py --shape 3b --device cuda --concurrency 64 --requests 64 \
  --baseline-requests 1 --tokens 128 --vision-images 1 --json "$out/load-process.json" 2>&1 | grep -v -E "Loading|Writing" | tee "$out/load-process.txt"
# Sampling: draws without sorting the vocabulary against sort + multinomial; batched penalties against row by row.
step sampling "${SAMPLING_S:-40}" python3 benchmarks/sampling.py --device cuda 2>&1 | tail -5 | tee "$out/sampling.txt"
# Constrained rows' masks over the real vocabulary: unpacked on the GPU from the packed bitmask against the old host unpacking.
step constrained "${CONSTRAINED_S:-30}" python3 benchmarks/constrained_step.py --device cuda 2>&1 | tail -5 | tee "$out/constrained.txt"
# The compiled decoder's fidelity (16 concurrent requests per family) with decode steps as CUDA graphs.
step compiled-tests "${COMPILED_TESTS_S:-100}" env LOCALVL_TEST_DEVICE=cuda python3 -m pytest -q -x -p no:cacheprovider \
  tests/engine/test_batching.py -k compiled 2>&1 | tail -15 | tee "$out/compiled-tests.txt"
# The same load with the text decoder compiled (torch.compile, layer by layer; its start-up compile is
# outside the timings): decode steps at batch 1 and 64 against the run above (on an H100, 2026-11-27,
# the 3B decoder compiled whole outlasted 150 s; layer by layer it is one layer's compile).
step compiled "${COMPILED_S:-200}" env LOCALVL_COMPILE=true python3 benchmarks/load.py --shape 3b --device cuda --concurrency 1,64 \
  --requests 64 --single-requests 4 --baseline-requests 1 --tokens 128 --in-process --json "$out/compiled.json" 2>&1 | grep -v -E "Loading|Writing" | tee "$out/compiled.txt"
step profile "${PROFILE_S:-60}" python3 benchmarks/profile_step.py --shape 3b --device cuda --batch 64 --tokens 24 --prefill 2>&1 | grep -v -E "Loading|Writing" | head -90 | tee "$out/profile.txt"
# How long 8 decoding streams pause while a 16-image request is prefilled, beside the tower's time for all 16.
step stall "${STALL_S:-45}" python3 benchmarks/image_stall.py --shape 3b --device cuda --images 16 2>&1 | grep -v -E "Loading|Writing" | tail -4 | tee "$out/stall.txt"
# The loading paths on the GPU: bf16 auto, flash-attention where installed, bitsandbytes 8/4-bit
# (carry its wheel and accelerate's in .whl: docs/MODELS.md).
step loading "${LOADING_S:-90}" python3 benchmarks/loading_check.py --device cuda 2>&1 | grep -v -E "Loading|Writing" | tail -8 | tee "$out/loading.txt"
# Last, off the GPU: the CPU decode kernel against gather + SDPA on this machine's many cores (it
# needs a C++ compiler there; without one it says so and stops).
step cpu-kernel "${CPU_KERNEL_S:-60}" python3 benchmarks/decode_attention.py --tokens 32 2>&1 | grep -v -E "Loading|Writing" | tail -6 | tee "$out/cpu-kernel.txt"
find "$out" -empty -delete
tar -C "$out" -czf "$dest/results.tgz" . && rm -rf "$out"
