#!/usr/bin/env bash
# Every GPU check of lmlab in one command, output saved under ${OUT:-./gpu-out} (issue 16).
#
#   bash bench/gpu_all.sh                     # from the repository root: parts "tests quant" (~5 min)
#   bash bench/gpu_all.sh tests quant pretrain
#   bash bench/gpu_all.sh pretrain            # the pre-training MFU run alone (~5 min, a command of its own)
#
# Parts (each under its own `timeout`; override with TESTS_TIMEOUT, KERNEL_TESTS_TIMEOUT, QUANT_TIMEOUT,
# PRETRAIN_TIMEOUT, in seconds):
#   tests     python -m pytest -q -m gpu tests/quant tests/eval, then the Triton kernel tests
#             tests/quant/kernels (on a GPU they run on CUDA; without one under TRITON_INTERPRET=1)
#             -> tests.log
#   quant     bench/gpu_quant.py: lmlab's NF4 / LLM.int8() layers beside dense bf16 and bitsandbytes,
#             quantize / dequantize, CUDA graphs, torch.compile, the issue's goals
#             -> gpu_quant.log, gpu_quant.csv, gpu_quant.json
#   pretrain  bench/gpu_check.sh: tokens/s and MFU of `lmlab pretrain` -> gpu_check.log
# The device machine allows 600 s per command and ~14 min in all: the default parts stay under 9 min
# (150 + 120 + 270 s) even when every timeout fires, and "pretrain" is meant to be run as a command of its own.
#
# Nothing is installed: lmlab runs from src/ through PYTHONPATH (a missing compiled CPU extension is
# fine). Python: $PYTHON, else the first of python, python3, .venv/bin/python that imports torch.
# On a machine without CUDA it says so, still runs the tests (the GPU ones skip, the kernel tests run
# under the interpreter) and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
OUTDIR=${OUT:-./gpu-out}
mkdir -p "$OUTDIR"
SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python python3 .venv/bin/python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
      PY=$candidate
      break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "no python that imports torch (tried python, python3, .venv/bin/python; set PYTHON=...)"
  exit 1
fi

PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(tests quant)
for part in "${PARTS[@]}"; do
  case "$part" in
    tests | quant | pretrain) ;;
    *)
      echo "unknown part '$part' (parts: tests quant pretrain)"
      exit 2
      ;;
  esac
done

note() { echo "$*" | tee -a "$SUMMARY"; }

echo "== environment ($PY; output in $OUTDIR)"
"$PY" - <<'PY' 2>&1 | tee "$OUTDIR/environment.txt"
import importlib, platform, sys
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
for name in ("triton", "bitsandbytes", "transformers"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:  # missing, or a CUDA library mismatch at import
        print(f"{name} n/a ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, {torch.cuda.device_count()} device(s)")
else:
    print("GPU none: no CUDA device visible")
PY
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 \
    | tee -a "$OUTDIR/environment.txt"
fi
HAVE_CUDA=0
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && HAVE_CUDA=1
[ "$HAVE_CUDA" = 1 ] || note "no CUDA device: the GPU tests skip, the kernel tests run under TRITON_INTERPRET=1, quant and pretrain print that they need a GPU"

# run_part NAME LOG TIMEOUT CMD...: the command under `timeout`, its output appended to LOG and shown.
run_part() {
  local name=$1 log=$2 limit=$3
  shift 3
  local t0=$SECONDS
  echo "== $name (timeout ${limit} s): $*" | tee -a "$log"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  local why=""
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && why=" (stopped at the time limit)"
  [ "$rc" = 5 ] && why=" (pytest: no tests selected)"
  note "$name: exit $rc$why in $((SECONDS - t0)) s"
  return 0
}

pytest_tail() {  # the closing line of each pytest run in a log ("3 passed, 2 skipped in 4.1s")
  grep -E "^(=+ )?[0-9]+ [a-z]+.* in [0-9.]+s|no tests ran" "$1" | tail -n 4
}

start=$SECONDS
for part in "${PARTS[@]}"; do
  case "$part" in
    tests)
      log="$OUTDIR/tests.log"
      : >"$log"
      run_part "gpu tests" "$log" "${TESTS_TIMEOUT:-150}" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/quant tests/eval
      run_part "kernel tests" "$log" "${KERNEL_TESTS_TIMEOUT:-120}" "$PY" -m pytest -q -p no:cacheprovider tests/quant/kernels
      ;;
    quant)
      log="$OUTDIR/gpu_quant.log"
      : >"$log"
      run_part "quant bench" "$log" "${QUANT_TIMEOUT:-270}" "$PY" -u bench/gpu_quant.py --out "$OUTDIR"
      ;;
    pretrain)
      log="$OUTDIR/gpu_check.log"
      : >"$log"
      if [ "$HAVE_CUDA" = 1 ]; then
        export PYTHON="$PY"  # bench/gpu_check.sh's interpreter
        run_part "pretrain (bench/gpu_check.sh)" "$log" "${PRETRAIN_TIMEOUT:-420}" bash bench/gpu_check.sh
      else
        note "pretrain: skipped, needs a CUDA device" | tee -a "$log"
      fi
      ;;
  esac
done

echo
echo "== summary ($((SECONDS - start)) s; files in $OUTDIR)"
cat "$SUMMARY"
if [ -s "$OUTDIR/tests.log" ]; then
  echo "-- tests (tests.log):"
  pytest_tail "$OUTDIR/tests.log"
  grep -E "^(FAILED|ERROR) " "$OUTDIR/tests.log" | head -n 10
fi
if [ -s "$OUTDIR/gpu_quant.log" ]; then
  echo "-- quant (gpu_quant.log):"
  grep -E "^(goal |compile |device copy|.* FAILED: |bench/gpu_quant.py needs)" "$OUTDIR/gpu_quant.log"
fi
if [ -s "$OUTDIR/gpu_check.log" ]; then
  echo "-- pretrain (gpu_check.log):"
  tail -n 12 "$OUTDIR/gpu_check.log"
fi
case " ${PARTS[*]} " in
  *" pretrain "*) ;;
  *) echo "pretrain MFU not run: 'bash bench/gpu_all.sh pretrain' (its own command, ~5 min)" ;;
esac
exit 0
