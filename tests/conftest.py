"""Test set-up: the Numba CUDA simulator for everything, except under `pytest -m gpu`.

The simulator must be chosen before numba.cuda is first imported, so nothing here imports numba
at module level. `pytest -m gpu` runs the same checks at GPT-2 shapes on a real GPU.
"""

import os
import sys

import numpy as np
import pytest


def _wants_real_gpu(config):
    return config.option.markexpr.strip() == "gpu"


def pytest_configure(config):
    if _wants_real_gpu(config):
        os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
    else:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        # Simulator threads are Python threads: switching faster makes barriers ~3x quicker.
        sys.setswitchinterval(5e-4)
    from numba.core import config as numba_config

    numba_config.reload_config()
    if numba_config.ENABLE_CUDASIM:
        from . import sim_shim

        sim_shim.install()


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name so a failure reproduces."""
    seed = abs(hash(request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)
