# Everything installs into .venv in the repository root.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The main job's output: its committed example is reports/example-synthetic-cpu.
OUT    ?= reports/example-synthetic-cpu
RECIPES ?= stock,fp32,bf16,int8-dynamic-fbgemm,fp32-compiled,int8-dynamic-compiled

.PHONY: install system-deps run test clean

# --no-cache-dir: torch's CUDA build brings ~3.5 GB of wheels; caching them as well as installing
# them (~6 GB) filled CI's disk once.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-cache-dir --upgrade pip
	$(BIN)/python -m pip install -q --no-cache-dir -e ".[test]"
	touch $@

install: $(BIN)/.installed

# flite speaks the English test sentences the ASR tests transcribe.
system-deps:
	@command -v flite >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q flite; }

# The main job on the offline default: synthetic ChatTTS, bundled Whisper weights.
run: install
	$(BIN)/python -m quantkit eval --model synthetic --recipes $(RECIPES) --texts en --limit 4 \
		--runs 3 --max-new-tokens 96 --out $(OUT)

test: install system-deps
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out
