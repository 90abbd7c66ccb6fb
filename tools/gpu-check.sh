#!/usr/bin/env bash
# The GPU measurements of issue 23, for a session lent a CUDA GPU, in parts that each fit one
# device call (every step has its own time limit, so one that hangs costs its limit, not the run;
# the limits of a part add up to at most 9 minutes). In order of importance:
#   1  the seed: stock ChatTTS with its own compile=True, first and warm call, on the CPU and the
#      GPU; cold start: a saved compilation loaded by a fresh process (first call against warm),
#      an exported variant's first audio and its time from process start
#   2  eval of fp32, stock, bf16-compiled and the GPU weight-only recipes (int8, fp8): speed,
#      fidelity to fp32 and Whisper ASR on the GPU, no call shapes
#   3  the CUDA tests; the eager int8 recipes on CUDA
#   4  eval of stock and bf16-compiled with the call shapes at batch 1, 16 and 64
# The GPU machine's image has PyTorch but not ChatTTS and the rest: here, `bash tools/gpu-wheels.sh`
# (after `make install`) puts their wheels in .whl/; the device call carries it (carry: [".whl"]) and
# runs `bash tools/gpu-check.sh 1` (timeout_s 560). Whisper's weights (75 MB) exceed what one call
# carries: part 1's call carries [".whl", ".asr/a"], part 2's [".whl", ".asr/b"] while the machine
# is still warm, and part 2 joins the halves (without both it evaluates with --skip-asr and says
# so). Results land in $OUT (the device tool's folder,
# or out/gpu): gpu-check.log (every step's output and time), measurements.jsonl (the JSON lines the
# steps print), test_cuda.log, and eval-N-results.json and eval-N-report.md. Synthetic weights are
# written once to out/gpu-cache, which a warm machine keeps between calls.
# A dry run of the mechanics on a CPU: MODEL=synthetic-tiny DEVICE=cpu bash tools/gpu-check.sh 1
# (PY=a python without quantkit's dependencies, and .whl/ built for it: the GPU image's situation)
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-1}
OUT=${OUT:-out/gpu}
MODEL=${MODEL:-synthetic}
DEVICE=${DEVICE:-cuda}
SCRATCH=$(mktemp -d)
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
JSONL="$OUT/measurements.jsonl"

if [ -z "${PY:-}" ] && [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else  # the GPU image: its python3 holds PyTorch; the rest comes from the carried wheels
  PY=${PY:-python3}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || { echo "wheels did not install: run tools/gpu-wheels.sh and carry .whl" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 QUANTKIT_CACHE=${QUANTKIT_CACHE:-$PWD/out/gpu-cache}
TEXT="The birch canoe slid on the smooth planks."

# step LIMIT NAME COMMAND...: its output into the log (and its JSON lines into measurements.jsonl)
step() {
  local limit=$1 name=$2 t0 rc
  shift 2
  t0=$(date +%s%N)
  echo "=== $name: $*" >>"$LOG"
  timeout "$limit" "$@" >"$SCRATCH/out" 2>&1
  rc=$?
  cat "$SCRATCH/out" >>"$LOG"
  grep '^{' "$SCRATCH/out" | sed "s/^{/{\"step\": \"$name\", /" >>"$JSONL"
  echo "=== $name: exit $rc after $(( ($(date +%s%N) - t0) / 1000000 )) ms$([ $rc = 124 ] && echo " (limit $limit s)")" | tee -a "$LOG"
}

eval_part() {  # eval_part N LIMIT ARGS...: an eval into scratch, its results and report into $OUT
  local n=$1 limit=$2
  shift 2
  step "$limit" "eval-$n" "$PY" -m quantkit eval --model "$MODEL" --device "$DEVICE" --skip-quality \
      --max-new-tokens 96 --limit 1 --out "$SCRATCH/eval" "$@"
  cp "$SCRATCH/eval/results.json" "$OUT/eval-$n-results.json" 2>/dev/null
  cp "$SCRATCH/eval/report.md" "$OUT/eval-$n-report.md" 2>/dev/null
}

# Whisper tiny.en into quantkit's cache from the two carried halves -> the eval's ASR option
asr_option() {
  local dir="$QUANTKIT_CACHE/whisper"
  if [ ! -f "$dir/tiny.en.pt" ] && [ -f .asr/a/tiny.en.pt.part ] && [ -f .asr/b/tiny.en.pt.part ]; then
    cat .asr/a/tiny.en.pt.part .asr/b/tiny.en.pt.part >"$SCRATCH/tiny.en.pt"
    if [ "$(sha256sum <"$SCRATCH/tiny.en.pt" | cut -d' ' -f1)" = "$(cat .asr/a/tiny.en.sha256)" ]; then
      mkdir -p "$dir" && cp .asr/a/tiny.en.json "$dir/" && mv "$SCRATCH/tiny.en.pt" "$dir/tiny.en.pt"
    fi
  fi
  if [ -f "$dir/tiny.en.pt" ]; then
    echo "ASR: Whisper tiny.en on $DEVICE" >>"$LOG"
  else
    echo "ASR: skipped (carry .asr/a with part 1 and .asr/b with part 2, the machine warm between)" >>"$LOG"
    echo --skip-asr
  fi
}

{ "$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null; } | tee -a "$LOG"

case "$PART" in
1)
  # the seed (the CPU row first: the GPU's first call may take minutes)
  step 200 seed "$PY" tools/seed_compile.py --model "$MODEL" --steps 96 --devices "cpu,$DEVICE"
  # cold start: the first process compiles and saves, a fresh one loads
  step 120 compile-cache-save "$PY" -m quantkit apply bf16-compiled --model "$MODEL" --device "$DEVICE" \
      --steps 96 --compile-cache "$SCRATCH/cc" --json
  step 60 compile-cache-load "$PY" -m quantkit apply bf16-compiled --model "$MODEL" --device "$DEVICE" \
      --steps 96 --compile-cache "$SCRATCH/cc" --json
  # one bucket, as before: the default adds 2 and 4 rows (minutes of CUDA compiles)
  step 120 export "$PY" -m quantkit export bf16-compiled --model "$MODEL" --device "$DEVICE" --batches 1 \
      --out "$SCRATCH/variant"
  step 60 variant-first-audio "$PY" -m quantkit synth --variant "$SCRATCH/variant" --device "$DEVICE" \
      --text "$TEXT" --steps 96 --out-wav "$SCRATCH/variant.wav"
  ;;
2)
  eval_part 2 540 --recipes stock,bf16-compiled,int8-weight-only-bf16-compiled,fp8-weight-only-compiled \
      --runs 3 --timeout 150 --skip-call-shapes $(asr_option)
  ;;
3)
  step 300 test_cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
  cp "$SCRATCH/out" "$OUT/test_cuda.log"
  # eager int8 on the GPU: refused at once (int8-dynamic), or finishes within its limit
  step 30 eager-int8-dynamic "$PY" -m quantkit apply int8-dynamic --model "$MODEL" --device "$DEVICE" --steps 32 --json
  step 120 eager-int8-weight-only "$PY" -m quantkit apply int8-weight-only --model "$MODEL" --device "$DEVICE" \
      --steps 32 --json
  ;;
4)
  eval_part 4 540 --recipes stock,bf16-compiled --runs 3 --timeout 240 --long-steps 1100 --batch-sizes 1,16,64 \
      --skip-asr
  ;;
*)
  echo "usage: tools/gpu-check.sh 1|2|3|4" >&2
  exit 2
  ;;
esac
rm -rf "$SCRATCH"
