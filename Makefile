# Two commands for a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
STAMP   := $(VENV)/.installed

.PHONY: demo test test-slow bench bench-deps clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the CPU wheel in the local wheel folder (a range would pull CUDA torch)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# spikingjelly (framework-import tests): its metadata requires torchvision, which would replace
	# the CPU torch by a CUDA build; it runs without it, so install it without dependencies
	$(PIP) install -q --no-deps spikingjelly==2.0.0
	$(PIP) install -q loguru scipy requests h5py packaging  # what spikingjelly imports
	# norse and sinabs (peer-model corpus, tests/test_peer_models.py): --no-deps for the same reason
	# (their metadata pulls torchvision/torchaudio or pins nir); their light imports by name
	$(PIP) install -q --no-deps norse sinabs
	$(PIP) install -q tqdm pbr
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m snnc.demo

test: $(STAMP)
	$(VPY) -m pytest

test-slow: $(STAMP)
	$(VPY) -m pytest -m slow

# peers for side-by-side benches, without their torchvision/torchaudio requirements
bench-deps: $(STAMP)

bench: bench-deps
	for b in bench/*.py; do $(VPY) -P $$b || exit 1; done  # -P: bench/tvm.py must not shadow tvm

clean:
	rm -rf $(VENV) build *.egg-info
