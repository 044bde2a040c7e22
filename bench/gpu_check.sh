#!/usr/bin/env bash
# On a lent GPU machine (H100/H200, 16 cores), in one go within 8 minutes: the whole test suite
# with CUDA (HETERO_TEST_DEVICE=cuda for gpu_kernels' tests), then every placement of
# `hetero bench` on the cuda lane (demo model, and the bench model of Qwen3-30B-A3B's geometry
# scaled to 8 layers x 32 experts), results under bench/results/gpu-check-DATE/.
#   bench/gpu_check.sh            (PYTHON=... picks the interpreter; default .venv/bin/python)
# Setup: ./dev test sets up .venv; where its torch has no CUDA, install a CUDA build first, e.g.
#   HETERO_TORCH=torch==2.13.0 HETERO_TORCH_INDEX=https://download.pytorch.org/whl/cu128 ./dev test
# (the device machine has no network: bring the venv with you). The transformers peer of step 3
# offloads with accelerate at the same VRAM budget. Not yet here: the issue's full GPU bench
# (48 layers x 128 experts in Q4_K, 16 GiB: needs a writer of random Q4_K GGUF blocks).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
fail() { echo "gpu_check: $*" >&2; exit 2; }

command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 \
  || fail "no NVIDIA GPU here (nvidia-smi sees none); run this on a lent GPU machine"
[ -x "$PY" ] || fail "$PY is missing: run ./dev test first (see the header), or set PYTHON"
"$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' \
  || fail "$PY's torch $("$PY" -c 'import torch; print(torch.__version__)') has no CUDA: install a CUDA build (see the header)"

OUT="bench/results/gpu-check-$(date +%F)"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv"
FAILED=""
# a step that fails (or runs past its limit: exit 124) is noted and the next one still runs
run() { local name="$1" limit="$2"; shift 2; echo "== $name" >&2
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt" || FAILED="$FAILED $name"; }

# 1. the suite, kernels on the GPU (budget: 4 of the 8 minutes)
HETERO_TEST_DEVICE=cuda run suite 240 "$PY" -m pytest -q -p no:cacheprovider tests
# 2. every placement on the cuda lane, the demo model (1 minute)
PLACEMENTS=cpu,torch,auto,disk-experts,hot-experts:4,attn-accel,layers-accel:2
run bench-demo 60 "$PY" -m hetero bench demo --accelerator cuda --placements "$PLACEMENTS" \
  --peers none -p 64 -n 16 --out "$OUT/demo"
# 3. the bench model: Qwen3-30B-A3B geometry, 8 layers x 32 experts, a VRAM budget that keeps
#    most routed experts in DRAM (2 minutes)
MODEL="${TMPDIR:-/tmp}/hetero-gpu-check-qwen3moe"
[ -d "$MODEL" ] || run make-model 60 "$PY" bench/make_bench_model.py "$MODEL" --layers 8 --experts 32
run bench-qwen3moe 120 "$PY" -m hetero bench "$MODEL" --accelerator cuda --vram-budget 3GiB \
  --placements cpu,auto,hot-experts:8 --peers transformers -p 256 -n 32 --out "$OUT/qwen3moe"
echo "gpu_check: results in $OUT${FAILED:+; failed:$FAILED}" >&2
[ -z "$FAILED" ]
