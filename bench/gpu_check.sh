#!/usr/bin/env bash
# GPU figures for `lmlab pretrain` in one short run (budget: under ~5 minutes on one H100/H200).
#
#   bash bench/gpu_check.sh            # from the repository root, on the GPU machine
#
# Prints tokens/s and model-FLOPs utilisation (MFU, dense bf16 peak 989 TFLOP/s for H100/H200 SXM)
# of lmlab's loop with bf16 autocast, fused AdamW and torch.compile for
#   gpt      GPT-2 124M (vocab 50304), 16 x 1024, next-token prediction
#   t5-base  T5 v1.1-base shapes (vocab 32128), 128 x 512 inputs -> 114 targets, span corruption
# then the same without torch.compile (eager) for comparison with the issue's reference:
#   H200, HF models: GPT-2 0.084 s/step eager, 0.045 compiled (31% MFU); T5-base 0.516 eager, 0.204 compiled.
#
# Needs on the machine: python >= 3.10 with torch (CUDA) and transformers, tokenizers, safetensors, numpy,
# tqdm importable.  Nothing is installed: the package runs from src/ through PYTHONPATH, so no pip
# access is needed.  The embedded default corpus is prepared once (~10-30 s, into ~/.cache/lmlab) only
# to get a tokenizer; the timed runs use synthetic uniform token ids (throughput only).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}

echo "== environment"
$PY - <<'PY' || { echo "missing dependencies (see the header of this script)"; exit 1; }
import torch, transformers, tokenizers, safetensors, numpy, tqdm
print(f"torch {torch.__version__}, transformers {transformers.__version__}, cuda {torch.version.cuda}")
assert torch.cuda.is_available(), "no CUDA device visible"
print(torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY

start=$(date +%s)
echo "== output projection + cross-entropy: lmlab's fused loss beside the plain path (bench/loss.py)"
timeout 60 $PY bench/loss.py --gpu --repeats 10 2>&1 | grep -v -E "UserWarning|warnings.warn|torchao|_pytree|register_constant"
echo "== compiled (bf16 autocast, fused AdamW, torch.compile); then eager"
# Compiled figures print first; the eager ones are the first thing dropped if time runs out.
timeout 240 $PY bench/pretrain.py --gpu --steps 30 --warmup-steps 12 --eager-too 2>&1 \
  | grep -v -E "Writing model shards|^lmlab pretrain: (step|done)|UserWarning|warnings.warn|torchao|_pytree|register_constant"
rc=${PIPESTATUS[0]}
echo "== done in $(( $(date +%s) - start )) s (exit $rc; 124 = stopped at the time limit)"
