"""nanollm.precompile: the signatures it compiles are the ones training launches (recorded on the
simulator over training steps with several flag sets), the worker pool (to PTX, no GPU needed), and
when train() uses it. That the cache it fills is the cache a launch reads is a GPU check
(benchmarks/startup_times.py's cold row)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from nanollm import precompile
from nanollm.config import GPT2Config

MICRO = GPT2Config(max_seq_len=4, vocab_size=13, padded_vocab_size=16, num_layers=1, num_heads=1, channels=8)


@pytest.fixture
def launches(monkeypatch):
    """{(module, kernel): {argument types}} of every kernel launch (not device calls) from now on."""
    import numba
    from numba.cuda.simulator import kernel as simulator_kernel

    seen = {}
    original = simulator_kernel.FakeCUDAKernel.__call__

    def recording(self, *args):
        if not (self._device or simulator_kernel._kernel_context):
            seen.setdefault((self.fn.__module__, self.fn.__name__), set()).add(tuple(numba.typeof(a) for a in args))
        return original(self, *args)

    monkeypatch.setattr(simulator_kernel.FakeCUDAKernel, "__call__", recording)
    return seen


# the second flag set runs the v1 kernels of the classifier and the layernorm (the defaults are v2, v3)
@pytest.mark.parametrize("flags", [dict(recompute=1, gelu_fusion=0),
                                   dict(recompute=0, gelu_fusion=2, classifier="v1", layernorm="v1")])
def test_training_launches_only_the_precompiled_signatures(launches, rng, monkeypatch, flags):
    from nanollm.kernels import classifier, layernorm
    from nanollm.model import GPT2

    flags = dict(flags)
    monkeypatch.setattr(classifier, "VARIANT", flags.pop("classifier", classifier.VARIANT))
    layernorm_variant = flags.pop("layernorm", None)
    if layernorm_variant:
        monkeypatch.setattr(layernorm, "FORWARD_VARIANT", layernorm_variant)
        monkeypatch.setattr(layernorm, "BACKWARD_VARIANT", layernorm_variant)
    model = GPT2(MICRO, 2, 4, seed=int(rng.integers(1000)), attention="numba", grad_accum_steps=2, **flags)
    tokens, targets = rng.integers(0, MICRO.vocab_size, (2, 2, 4))
    model.zero_grad()
    for _ in range(2):
        model.forward(tokens, targets)
        model.backward()
    model.update_clipped(1e-3, 0.1, 1.0)
    model.forward(tokens)  # inference (no targets): the logits kept
    jobs = precompile.kernel_jobs()
    assert len(launches) >= 15, sorted(launches)
    chosen = classifier.TRAINING_KERNELS[classifier.VARIANT].py_func.__name__
    assert ("nanollm.kernels.classifier", chosen) in launches
    backward = layernorm.BACKWARD_KERNELS[layernorm.BACKWARD_VARIANT].py_func.__name__
    assert ("nanollm.kernels.layernorm", backward) in launches
    if layernorm.BACKWARD_VARIANT in layernorm.BACKWARD_SUMS_KERNELS:  # the layers' residual bias gradients
        fused = layernorm.BACKWARD_SUMS_KERNELS[layernorm.BACKWARD_VARIANT].py_func.__name__
        assert ("nanollm.kernels.layernorm", fused) in launches
    # a fresh machine's pool compiles what the run launches (with these variants, llm.c's attention)
    assert set(launches) <= set(precompile.training_jobs("numba")), \
        sorted(set(launches) - set(precompile.training_jobs("numba")))
    for (module_name, kernel_name), signatures in launches.items():
        assert (module_name, kernel_name) in jobs, f"{module_name}.{kernel_name} is launched but has no PTX signature"
        _, signature = precompile._lookup(module_name, kernel_name)
        assert signatures == {precompile._argument_types(signature)}, \
            f"{module_name}.{kernel_name}: launched with {signatures}, precompiled as {signature}"


def test_jobs_are_every_kernel_of_the_signature_modules():
    jobs = precompile.kernel_jobs()
    assert len(jobs) == len(set(jobs)) >= 25
    assert ("nanollm.kernels.layernorm", "layernorm_backward_kernel") in jobs
    assert "nanollm.kernels.attention_cudnn" not in precompile.kernel_modules()  # no kernels; loads cuDNN


def test_the_slowest_kernels_to_compile_are_handed_out_first():
    jobs = precompile.kernel_jobs()
    # a kernel renamed or removed would silently drop out of the list: each must still be a job
    assert list(precompile.SLOWEST_TO_COMPILE) == jobs[:len(precompile.SLOWEST_TO_COMPILE)]


def test_pool_compiles_and_reports_each_job(monkeypatch):
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "0")  # the workers use the real compiler (to PTX)
    jobs = [("nanollm.kernels.gelu", "gelu_forward_kernel"), ("nanollm.kernels.gelu", "no_such_kernel"),
            ("nanollm.kernels.residual_nowhere", "kernel")]
    results = precompile.compile_kernels(jobs, workers=2, target="ptx", timeout=120)
    by_job = {(m, k): error for m, k, _, error in results}
    assert set(by_job) == set(jobs)
    assert by_job[jobs[0]] is None
    assert "KeyError" in by_job[jobs[1]] and "ModuleNotFoundError" in by_job[jobs[2]]


def _stand_in_workers(monkeypatch, tmp_path, worker_source):
    """compile_kernels' workers run `worker_source` as nanollm/precompile.py instead of the real one."""
    fake = tmp_path / "nanollm"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "precompile.py").write_text(worker_source)
    monkeypatch.setattr(precompile, "__file__", str(fake / "precompile.py"))


def test_a_worker_that_dies_fails_its_job_only(monkeypatch, tmp_path):
    # workers that exit at once: every job fails, the caller returns
    _stand_in_workers(monkeypatch, tmp_path, "import sys\nsys.exit(3)\n")
    results = precompile.compile_kernels([("a", "b"), ("c", "d"), ("e", "f")], workers=2, target="ptx", timeout=30)
    assert sorted((m, k, e) for m, k, _, e in results) == [("a", "b", "worker process exited with status 3"),
                                                           ("c", "d", "worker process exited with status 3"),
                                                           ("e", "f", "no worker process left")]


def test_stray_output_of_a_worker_is_not_an_answer(monkeypatch, tmp_path):
    _stand_in_workers(monkeypatch, tmp_path, textwrap.dedent("""
        import json, sys
        for line in sys.stdin:
            module, kernel = line.split()
            print("a warning printed by some library\\n0\\n[1, 2]", flush=True)
            print(json.dumps([module, kernel, 0.5, None]), flush=True)
    """))
    results = precompile.compile_kernels([("a", "b"), ("c", "d"), ("e", "f")], workers=2, target="ptx", timeout=30)
    assert sorted(results) == [("a", "b", 0.5, None), ("c", "d", 0.5, None), ("e", "f", 0.5, None)]


def test_workers_past_the_timeout_are_killed_and_their_jobs_fail(monkeypatch, tmp_path):
    _stand_in_workers(monkeypatch, tmp_path, "import time\ntime.sleep(60)\n")
    results = precompile.compile_kernels([("a", "b"), ("c", "d"), ("e", "f")], workers=2, target="ptx", timeout=1.0)
    assert sorted((m, k, e) for m, k, _, e in results) == [("a", "b", "not done after 1 s"),
                                                           ("c", "d", "not done after 1 s"),
                                                           ("e", "f", "not started after 1 s")]


# Numba's cache internals that missing_from_cache reads, exercised without a GPU: the GPU's identity
# (compute capability, CUDA version) stood in, an entry written under the key a launch computes.
CACHE_CHECK_SCRIPT = textwrap.dedent("""
    import json, types
    import numba.cuda.dispatcher as dispatcher_module
    from numba.cuda import codegen
    dispatcher_module.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
    codegen.JITCUDACodegen.magic_tuple = lambda self: ((13, 0), (9, 0))
    from nanollm import precompile
    jobs = [("nanollm.kernels.gelu", "gelu_forward_kernel"), ("nanollm.kernels.gelu", "gelu_backward_inplace_kernel")]
    before = precompile.missing_from_cache(jobs)
    dispatcher, signature = precompile._lookup(*jobs[0])
    cache = dispatcher._cache
    cache._impl.locator.ensure_cache_path()
    key = cache._index_key(precompile._argument_types(signature), dispatcher.targetctx.codegen())
    cache._cache_file.save(key, b"a stand-in entry")
    print(json.dumps([before, precompile.missing_from_cache(jobs)]))
""")


def test_cache_check_finds_an_entry_under_the_launch_key(tmp_path):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", NUMBA_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", CACHE_CHECK_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = json.loads(proc.stdout.strip().splitlines()[-1])
    assert before == [["nanollm.kernels.gelu", "gelu_forward_kernel"], ["nanollm.kernels.gelu",
                                                                          "gelu_backward_inplace_kernel"]]
    assert after == [["nanollm.kernels.gelu", "gelu_backward_inplace_kernel"]]


class _World:
    def __init__(self, local_rank=0, size=1):
        self.local_rank, self.size, self.gathers = local_rank, size, 0

    def allgather(self, obj):
        self.gathers += 1
        return [obj] * self.size


def _not_simulated(monkeypatch, missing, results=()):
    """before_training as on a GPU: the cache check and the pool replaced by stand-ins."""
    from nanollm.kernels import cuda_common

    monkeypatch.setattr(cuda_common, "SIMULATOR", False)
    calls = []
    monkeypatch.setattr(precompile, "kernel_jobs", lambda: [("m", "a"), ("m", "b"), ("m", "c")])
    if isinstance(missing, Exception):
        def check(jobs):
            raise missing
    else:
        def check(jobs):
            return [job for job in jobs if job[1] in missing]
    monkeypatch.setattr(precompile, "missing_from_cache", check)

    def pool(jobs, workers, target, device_index, timeout):
        calls.append((jobs, target, device_index))
        assert timeout == precompile.TRAINING_TIMEOUT
        return [(m, k, 1.0, "SyntaxError: no" if k in results else None) for m, k in jobs]

    monkeypatch.setattr(precompile, "compile_kernels", pool)
    return calls


def test_before_training_compiles_only_what_is_missing(monkeypatch):
    calls = _not_simulated(monkeypatch, missing={"a", "c"}, results={"c"})
    printed = []
    precompile.before_training(_World(), 3, print=printed.append, environ={})
    assert calls == [([("m", "a"), ("m", "c")], "cache", 3)]
    assert len(printed) == 1 and printed[0].startswith("compiled 1 of 2 kernels for this GPU into Numba's cache")
    assert printed[0].endswith("; at first launch instead: m.c")


def test_before_training_does_nothing_when_warm_off_or_not_first_on_host(monkeypatch):
    calls = _not_simulated(monkeypatch, missing=set())
    printed = []
    precompile.before_training(_World(), 0, print=printed.append, environ={})  # warm
    _not_simulated(monkeypatch, missing={"a"})
    precompile.before_training(_World(), 0, print=printed.append, environ={"NANOLLM_PRECOMPILE": "0"})
    world = _World(local_rank=1, size=2)
    precompile.before_training(world, 0, print=printed.append, environ={})
    assert calls == [] and printed == []
    assert world.gathers == 1  # the host's other ranks wait for the first one


def test_before_training_survives_a_failing_cache_check(monkeypatch):
    calls = _not_simulated(monkeypatch, missing=AttributeError("'CUDACache' object has no attribute '_cache_file'"))
    printed = []
    assert precompile.before_training(_World(), 0, print=printed.append, environ={}) == []
    assert calls == [] and "kernel cache check failed (AttributeError" in printed[0]


def test_before_training_is_off_on_the_simulator(monkeypatch):
    monkeypatch.setattr(precompile, "kernel_jobs", lambda: pytest.fail("checked the cache on the simulator"))
    assert precompile.before_training(_World(), 0, print=print, environ={}) == []


def test_training_jobs_leave_out_the_unpicked_variants_and_the_other_attention(monkeypatch):
    from nanollm.kernels import attention, classifier, layernorm

    def names(*kernels):
        return precompile._names(kernels)

    every = set(precompile.kernel_jobs())
    own_attention = names(*attention.PTX_SIGNATURES)
    for variants in [("v3", "v4", "v5"), ("v2", "v1", "v1"), ("v1", "v3", "v3"), ("v3", "v2", "v5")]:
        monkeypatch.setattr(classifier, "VARIANT", variants[0])
        monkeypatch.setattr(layernorm, "FORWARD_VARIANT", variants[1])
        monkeypatch.setattr(layernorm, "BACKWARD_VARIANT", variants[2])
        cudnn, numba = set(precompile.training_jobs("cudnn")), set(precompile.training_jobs("numba"))
        assert cudnn == numba - own_attention and own_attention <= numba
        assert precompile.training_jobs("numba") == [job for job in precompile.kernel_jobs() if job in numba]
        # the picked variants, and what they fall back to
        kept = names(classifier.TRAINING_KERNELS[variants[0]], classifier.fused_classifier_kernel,
                     layernorm.FORWARD_KERNELS[variants[1]], layernorm.FUSED_FORWARD_KERNELS[variants[1]],
                     layernorm.BACKWARD_KERNELS[variants[2]])
        if variants[1] == "v4":  # above 1,024 channels v4 runs v3
            kept |= names(layernorm.FORWARD_KERNELS["v3"])
        if variants[2] in layernorm.BACKWARD_SUMS_KERNELS:
            kept |= names(layernorm.BACKWARD_SUMS_KERNELS[variants[2]])
        assert kept <= numba
        variant_kernels = names(*classifier.TRAINING_KERNELS.values(), *layernorm.FORWARD_KERNELS.values(),
                                *layernorm.FUSED_FORWARD_KERNELS.values(), *layernorm.BACKWARD_KERNELS.values(),
                                *layernorm.BACKWARD_SUMS_KERNELS.values())
        assert numba & variant_kernels == kept  # no other variant
        assert every - variant_kernels - own_attention <= cudnn  # every kernel without variants stays
    for installed, same_as in [(True, cudnn), (False, numba)]:  # "auto": cuDNN's if its frontend is installed
        monkeypatch.setattr(precompile, "_cudnn_frontend_installed", lambda: installed)
        assert set(precompile.training_jobs("auto")) == same_as
