#!/usr/bin/env bash
# GPU smoke run: what a user with one GPU runs first. Not run in CI (CI has no GPU).
#
#   bash benchmarks/gpu_smoke.sh                                          # the embedded SmolLM2 on vLLM
#   MODEL=/models/Qwen2.5-0.5B-Instruct bash benchmarks/gpu_smoke.sh      # any small local HF folder
#
# 1. `fescale plan` checks that the model fits this GPU (name and memory from nvidia-smi);
# 2. pipeline efficiency: fescale against raw vLLM on the same GPU (benchmarks/efficiency.py, --quick
#    --beside: also raw vLLM with the Ray cluster idling beside it, so (b)/(a') is the engine's own cost);
# 3. serve latency: greedy vs Feedback-Edit requests against one Serve app, 4 in flight
#    (results in benchmarks/results/serve_latency_gpu.md).
# Every role runs on one vLLM engine holding the whole GPU (num_gpus=1: TP 1). Nothing is downloaded:
# MODEL is 'embedded' or a local folder. PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL="${MODEL:-embedded}"
PYTHON="${PYTHON:-python}"

if ! command -v nvidia-smi >/dev/null; then
  echo "gpu_smoke: no nvidia-smi here; this script needs one NVIDIA GPU (the CPU benchmarks run without it)" >&2
  exit 1
fi
if ! "$PYTHON" -c "import vllm" 2>/dev/null; then
  echo "gpu_smoke: $PYTHON cannot import vllm; install the CUDA build (pip install vllm) in this environment" >&2
  exit 1
fi

# The first GPU as a cluster description for the planner: "NVIDIA L4, 23034" (MiB) -> 1xL4-24GB.
IFS=, read -r gpu_name gpu_mib < <(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits | head -1)
gpu_name="$(echo "$gpu_name" | sed -e 's/^ *NVIDIA *//' -e 's/[^A-Za-z0-9.]\+/_/g' -e 's/_$//')"
gpu_gb="$(( ${gpu_mib// /} * 1048576 / 1000000000 ))"
cluster="1x${gpu_name}-${gpu_gb}GB,cpu:$(nproc)"

ROLE=(--set roles.generator.backend=vllm --set roles.generator.num_gpus=1 --set "roles.generator.model=$MODEL" --set roles.generator.num_cpus=1)
LONGER=(--set generate.max_tokens=512 --set feedback.max_tokens=256 --set edit.max_tokens=512)  # the CPU preset keeps answers short

echo "== 1/3 placement plan on $cluster"
"$PYTHON" -m cli plan --config feedback_edit "${ROLE[@]}" "${LONGER[@]}" --cluster "$cluster"

echo "== 2/3 pipeline efficiency: fescale vs raw vLLM"
"$PYTHON" -m benchmarks.efficiency --backend vllm --quick --beside "${ROLE[@]}"

echo "== 3/3 serve latency: greedy vs Feedback-Edit requests"
"$PYTHON" -m benchmarks.serve_latency --config feedback_edit "${ROLE[@]}" "${LONGER[@]}" \
  --repeats 3 --concurrency 4 --output benchmarks/results/serve_latency_gpu
