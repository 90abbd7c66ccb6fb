#!/usr/bin/env bash
# The GPU measurements in one run (issue 23), for a session lent a CUDA GPU: the CUDA tests, then
# a CUDA eval of stock against bf16-compiled with the call shapes at batch 1, 16 and 64.
# Writes into ${OUT:-out/gpu}: test_cuda.log and eval/ (results.json, report.md, report.html).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
"$PY" -m pytest -q tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"
"$PY" -m quantkit eval --model synthetic --device cuda --skip-asr --skip-quality \
    --recipes stock,bf16-compiled --max-new-tokens 96 --runs 5 --limit 2 \
    --long-steps 1100 --batch-sizes 1,16,64 --out "$OUT/eval"
