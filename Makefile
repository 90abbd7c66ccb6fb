# Everything installs into .venv in the repository root, exactly as uv.lock pins it (hashes
# checked). uv itself is pinned by hash in tools/uv-requirements.txt and lives in .tools/.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UV     := .tools/bin/uv
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The main job's output: its committed example is reports/example-synthetic-cpu.
OUT    ?= reports/example-synthetic-cpu
RECIPES ?= stock,fp32,bf16,int8-dynamic-fbgemm,fp32-compiled,int8-dynamic-compiled

.PHONY: install lock lock-check system-deps run test clean

$(UV): tools/uv-requirements.txt
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install -q --no-cache-dir --require-hashes -r tools/uv-requirements.txt
	touch $@

# Bytecode compiled at install: a process that cannot write it (PYTHONDONTWRITEBYTECODE, a
# read-only install) would otherwise compile torch's and ChatTTS's sources at every start.
$(BIN)/.installed: pyproject.toml uv.lock $(UV)
	$(UV) sync --frozen --extra test --compile-bytecode --python $(PYTHON)
	touch $@

install: $(BIN)/.installed

# Refresh uv.lock after changing a dependency in pyproject.toml; commit both.
lock: $(UV)
	$(UV) lock

# Fails when uv.lock no longer matches pyproject.toml.
lock-check: $(UV)
	$(UV) lock --check

# flite speaks the English test sentences; Chromium and its driver render report.html in a test.
system-deps:
	@command -v flite >/dev/null && command -v chromedriver >/dev/null || { $(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q --no-install-recommends flite chromium chromium-driver; }

# The main job on the offline default: synthetic ChatTTS, bundled Whisper weights.
run: install
	$(BIN)/python -m quantkit eval --model synthetic --recipes $(RECIPES) --texts en --limit 4 \
		--runs 3 --max-new-tokens 96 --long-steps 300 --batch-sizes 1,4,8 --out $(OUT)

test: install lock-check system-deps
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) .tools out
