"""Test set-up: the Numba CUDA simulator for everything, except under `pytest -m gpu`.

The simulator must be chosen before numba.cuda is first imported, so nothing here imports numba
at module level. `pytest -m gpu` runs the same checks at GPT-2 shapes on a real GPU.
"""

import os
import sys
import zlib

import numpy as np
import pytest


def _wants_real_gpu(config):
    """`pytest -m gpu`, or NANOLLM_TEST_DEVICE=gpu to run every test (tiny shapes too) on a GPU."""
    return config.option.markexpr.strip() == "gpu" or os.environ.get("NANOLLM_TEST_DEVICE") == "gpu"


def pytest_configure(config):
    if _wants_real_gpu(config):
        os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
    else:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        # Simulator threads are Python threads: switching faster makes barriers ~3x quicker.
        sys.setswitchinterval(5e-4)
    # tiny test grids are deliberate: no occupancy warnings
    os.environ["NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS"] = "0"
    from numba.core import config as numba_config

    numba_config.reload_config()
    if numba_config.ENABLE_CUDASIM:
        from . import sim_shim

        sim_shim.install()


# Fresh random inputs every run; NANOLLM_TEST_SEED=<n> replays a run (the seed is in the header,
# and, since `make test` runs -q, which hides the header, in the last lines too).
SESSION_SEED = int(os.environ.get("NANOLLM_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
# make test runs the tests in worker processes (pytest-xdist's -n), started after this module is
# first imported in the main process: they inherit the seed from here, so the run has one seed.
os.environ["NANOLLM_TEST_SEED"] = str(SESSION_SEED)


def pytest_report_header(config):
    device = "real GPU" if _wants_real_gpu(config) else "Numba CUDA simulator"
    return f"nanollm: kernels on the {device}; NANOLLM_TEST_SEED={SESSION_SEED}"


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"replay this run's random inputs with NANOLLM_TEST_SEED={SESSION_SEED}")


@pytest.fixture
def rng(request):
    """A generator per test: the session seed mixed with the test's id."""
    return np.random.default_rng([SESSION_SEED, zlib.crc32(request.node.nodeid.encode())])
