#!/usr/bin/env bash
# The wheels quantkit needs on the GPU machine beyond its PyTorch image (issue 23): the packages
# below, at uv.lock's versions, for the image's Python, into .whl/ (ignored by git). Run here,
# where PyPI is reachable; tools/gpu-check.sh installs them there (the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
PY=${PY:-.tools/bin/python}  # the tools environment (make install): pip and tomllib
# What the image lacks (its package list: the device library's KINDS.md), found by running the GPU
# check's commands in an environment holding only the image's packages.
PACKAGES=(chattts vector-quantize-pytorch vocos einx frozendict encodec torch-einops-utils
          pybase16384 torchao jiwer rapidfuzz loguru openai-whisper more-itertools soundfile cffi pycparser)
rm -rf "$DEST" && mkdir -p "$DEST"
for pin in $("$PY" - "${PACKAGES[@]}" <<'PYEOF'
import sys, tomllib
locked = {p["name"]: p["version"] for p in tomllib.load(open("uv.lock", "rb"))["package"]}
print(" ".join(f"{n}=={locked[n]}" for n in sys.argv[1:]))
PYEOF
); do
  # binary wheels for the image's Python; a package published as source only is built here
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" "$pin" 2>/dev/null ||
    "$PY" -m pip wheel -q --no-deps -w "$DEST" "$pin"
done
du -sh "$DEST"

# Whisper tiny.en for ASR on the GPU: quantkit's converted checkpoint in fp16 (lossless: the
# bundle's weights are fp16), in two halves, as one device call carries at most 64 MiB
# (tools/gpu-check.sh: part 1 carries .asr/a, part 2 .asr/b and joins them).
ASR=${ASR:-.asr}
rm -rf "$ASR"
.venv/bin/python - "$ASR" <<'PYEOF'
import hashlib, io, sys
from pathlib import Path

import torch

from quantkit.asr import convert_bundle

src = convert_bundle("tiny.en")
ck = torch.load(src, weights_only=True)
half = {k: v.half() if v.is_floating_point() else v for k, v in ck["model_state_dict"].items()}
assert all(torch.equal(v.to(ck["model_state_dict"][k].dtype), ck["model_state_dict"][k]) for k, v in half.items())
buf = io.BytesIO()
torch.save({"dims": ck["dims"], "model_state_dict": half}, buf)
data, out = buf.getvalue(), Path(sys.argv[1])
for name, part in (("a", data[:len(data) // 2]), ("b", data[len(data) // 2:])):
    (out / name).mkdir(parents=True)
    (out / name / "tiny.en.pt.part").write_bytes(part)
(out / "a" / "tiny.en.json").write_text(src.with_suffix(".json").read_text())
(out / "a" / "tiny.en.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
PYEOF
du -sh "$ASR"/a "$ASR"/b
