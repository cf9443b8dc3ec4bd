#!/usr/bin/env bash
# One GPU session's checks, in the order that matters: the engine's tests on CUDA, then the load
# benchmark on the 3B shape, then where a step's time goes. Output under $OUT (or ./device-out).
# Usage on a bare device machine (see docs/PERFORMANCE.md): bash benchmarks/device_check.sh
set -u
out=${OUT:-device-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
LOCALVL_TEST_DEVICE=cuda timeout "${TESTS_S:-200}" python3 -m pytest -q -x -p no:cacheprovider tests/engine tests/models/test_patches.py 2>&1 | tail -15 | tee "$out/tests.txt"
# In the server's process first, where its steps can be timed; then as `localvl serve` runs it (the
# engine in a process of its own) at 64 concurrent.
timeout "${LOAD_S:-240}" python3 benchmarks/load.py --shape 3b --device cuda --concurrency 1,16,64 --requests 64 \
  --single-requests 8 --baseline-requests 2 --tokens 128 --in-process --json "$out/load.json" 2>&1 | grep -v -E "Loading|Writing" | tee "$out/load.txt"
timeout "${LOAD_PROCESS_S:-150}" python3 benchmarks/load.py --shape 3b --device cuda --concurrency 64 --requests 64 \
  --baseline-requests 1 --tokens 128 --vision-images 1 --json "$out/load-process.json" 2>&1 | grep -v -E "Loading|Writing" | tee "$out/load-process.txt"
timeout "${PROFILE_S:-80}" python3 benchmarks/profile_step.py --shape 3b --device cuda --batch 64 --tokens 24 2>&1 | grep -v -E "Loading|Writing" | head -60 | tee "$out/profile.txt"
# How long 8 decoding streams pause while a 16-image request is prefilled, beside the tower's time for all 16.
timeout "${STALL_S:-60}" python3 benchmarks/image_stall.py --shape 3b --device cuda --images 16 2>&1 | grep -v -E "Loading|Writing" | tail -4 | tee "$out/stall.txt"
# The loading paths on the GPU: bf16 auto, flash-attention where installed, bitsandbytes 8/4-bit
# (carry its wheel and accelerate's in .whl: docs/MODELS.md).
timeout "${LOADING_S:-90}" python3 benchmarks/loading_check.py --device cuda 2>&1 | grep -v -E "Loading|Writing" | tail -8 | tee "$out/loading.txt"
# Last, off the GPU: the CPU decode kernel against gather + SDPA on this machine's many cores (it
# needs a C++ compiler there; without one it says so and stops).
timeout "${CPU_KERNEL_S:-60}" python3 benchmarks/decode_attention.py --tokens 32 2>&1 | grep -v -E "Loading|Writing" | tail -6 | tee "$out/cpu-kernel.txt"
