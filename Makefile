# The two README commands: `make demo` and `make test`. Both work on a fresh Debian 12
# machine as root with nothing but this repo, and reuse what already exists on a second run.

VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMPS  := .stamps
# System packages: lavapipe (CPU Vulkan) so wgpu has an adapter on machines without a GPU.
SYSPKGS := mesa-vulkan-drivers libvulkan1
FIXTURES ?= $(abspath ../shared/fixtures/official)

.PHONY: sysdeps venv build-dev test test-rust test-python demo lint bench clean

$(STAMPS):
	mkdir -p $(STAMPS)

# Installs the Debian packages above when one is missing (needs root or sudo).
sysdeps:
	@missing=""; for p in $(SYSPKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Python dependencies (runtime + test extras); re-run only when pyproject.toml changes.
$(STAMPS)/deps: pyproject.toml | $(PY) $(STAMPS)
	$(PIP) install -q "maturin>=1.9,<2"
	$(PIP) install -q numpy pillow safetensors tqdm torch "av==18.1.0" "wgpu==0.32.0" "pytest>=8" "hypothesis>=6.100" "ruff>=0.6,<0.18" "atheris>=3.0,<4"
	touch $@

venv: $(STAMPS)/deps

# Builds the Rust extension in release mode and installs the package (editable) into .venv.
build-dev: sysdeps venv
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH \
	  $(VENV)/bin/maturin develop --release -q

test-rust: sysdeps
	cargo test --release -q

test-python: build-dev
	AUTOGAZE_FIXTURES=$(FIXTURES) $(PY) -m pytest -q

test: test-rust test-python

demo: build-dev
	$(PY) -m autogaze_wgpu demo

lint: venv
	cargo fmt --check
	cargo clippy --all-targets --features python -- -D warnings
	$(VENV)/bin/ruff check python tests scripts

bench: build-dev
	$(PY) -m autogaze_wgpu.bench

clean:
	rm -rf target $(STAMPS)
