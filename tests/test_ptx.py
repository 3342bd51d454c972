"""Every kernel compiles to PTX for sm_90: catches typing errors the simulator never sees."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanollm import precompile

pytestmark = pytest.mark.ptx

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def ptx_results():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", NUMBA_DISABLE_CUDA="0")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ptx_compile.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _expected_kernels():
    # every module in nanollm/kernels that defines PTX_SIGNATURES, found from the sources (nothing
    # imported: this process runs the simulator)
    return [name.rsplit(".", 1)[-1] for name in precompile.kernel_modules()]


@pytest.mark.parametrize("module", _expected_kernels())
def test_kernels_compile_for_sm90(ptx_results, module):
    mine = {k: v for k, v in ptx_results.items() if k.startswith(module + ".")}
    assert mine, f"no kernels of {module} were compiled"
    failures = {k: v for k, v in mine.items() if v is not None}
    assert not failures, failures
