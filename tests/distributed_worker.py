"""What tests/test_distributed.py runs in every rank under `mpiexec -n N`:

    python tests/distributed_worker.py train OUT.json '{"model": "d1", ...}' [FAIL_RANK]
        nanollm.train with these TrainConfig fields; rank 0 writes the TrainResult to OUT.json.
        FAIL_RANK: that rank's second backward raises (the job must end, not hang).
    python tests/distributed_worker.py comm
        the MPI communicator's collectives on numpy arrays and (simulator) device arrays against numpy.
    python tests/distributed_worker.py gpu-model OUT.npz
        the GPU model (Numba CUDA simulator) at a tiny shape: one step at -z 0 and at -z 1 (the
        per-layer reductions of the NCCL path, run through MPI); rank 0 writes both results.
"""

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def train(out, settings, fail_rank=None):
    import nanollm
    from nanollm import distributed, reference

    world = distributed.init_world()
    if fail_rank is not None and world.rank == int(fail_rank):
        backward, calls = reference.gpt2_backward, []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError(f"injected failure in rank {world.rank}'s second backward")
            return backward(*args, **kwargs)

        reference.gpt2_backward = failing
    result = nanollm.train(nanollm.TrainConfig(**settings))
    if world.rank == 0:
        with open(out, "w") as f:
            json.dump({"train_losses": result.train_losses, "grad_norms": result.grad_norms,
                       "val_losses": {str(k): v for k, v in result.val_losses.items()},
                       "checkpoints": result.checkpoints, "first_step": result.first_step}, f)


def check_communicator():
    use_simulator()
    from numba import cuda

    from nanollm import distributed
    from nanollm.kernels.bf16 import from_bf16_bits, to_bf16_bits

    world = distributed.init_world()
    comm = distributed.MpiCommunicator(world)
    rank, size = comm.rank, comm.size
    data = [np.random.default_rng(r).standard_normal(8 * size).astype(np.float32) for r in range(size)]
    mine = data[rank].copy()
    comm.all_reduce(mine, "sum")
    np.testing.assert_allclose(mine, sum(data), rtol=1e-6)
    mine = data[rank].copy()
    comm.reduce_scatter(mine, "avg")
    chunk = slice(rank * 8, (rank + 1) * 8)
    np.testing.assert_allclose(mine[chunk], (sum(data) / size)[chunk], rtol=1e-6)
    np.testing.assert_array_equal(mine[:chunk.start], data[rank][:chunk.start])  # the other chunks untouched
    mine = np.zeros(8 * size, np.float32)
    mine[chunk] = data[rank][chunk]
    comm.all_gather(mine)
    np.testing.assert_array_equal(mine, np.concatenate([data[r][r * 8:(r + 1) * 8] for r in range(size)]))
    # device arrays: bf16 bits widened to fp32, reduced, rounded to nearest even
    bits = [to_bf16_bits(d) for d in data]
    device = cuda.to_device(bits[rank])
    comm.all_reduce(device, "avg", stream=cuda.stream())
    expected = to_bf16_bits(sum(from_bf16_bits(b) for b in bits) / np.float32(size))
    np.testing.assert_array_equal(device.copy_to_host(), expected)
    device = cuda.to_device(bits[rank])
    comm.reduce_scatter(device, "avg")
    np.testing.assert_array_equal(device.copy_to_host()[chunk], expected[chunk])
    device = cuda.to_device(np.where(np.arange(8 * size) // 8 == rank, bits[rank], 0).astype(np.uint16))
    comm.all_gather(device)
    np.testing.assert_array_equal(device.copy_to_host(), np.concatenate([bits[r][r * 8:(r + 1) * 8]
                                                                         for r in range(size)]))
    device = cuda.to_device(data[rank])
    comm.broadcast(device, root=size - 1)
    np.testing.assert_array_equal(device.copy_to_host(), data[size - 1])
    # host values, for flags and counts
    assert comm.all_reduce_host(float(rank + 1)) == size * (size + 1) / 2
    assert comm.all_reduce_host(float(rank), "max") == size - 1
    np.testing.assert_array_equal(comm.all_reduce_host(np.array([rank, 1.0]), "sum"), [size * (size - 1) / 2, size])
    assert comm.any(rank == size - 1) and not comm.any(False)
    assert comm.all_gather_object(f"r{rank}") == [f"r{r}" for r in range(size)]
    assert comm.broadcast_object("from 0" if rank == 0 else None) == "from 0"


def use_simulator():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    sys.setswitchinterval(5e-4)
    from tests import sim_shim

    sim_shim.install()


def gpu_model(out):
    """One training step of a tiny GPT2 on every rank (its own tokens) at -z 0 through the MPI
    communicator (reduced after the backward) and at -z 1 with the communicator taken for a
    stream-ordered one (reduced layer by layer inside the backward, as NCCL is)."""
    use_simulator()
    from nanollm import distributed, zero
    from nanollm.config import GPT2Config
    from nanollm.model import GPT2

    class StreamOrderedMpi(distributed.MpiCommunicator):
        stream_ordered = True  # the simulator runs streams synchronously, so host staging stays correct

    world = distributed.init_world()
    config = GPT2Config(max_seq_len=4, vocab_size=29, padded_vocab_size=32, num_layers=1, num_heads=2, channels=8)
    tokens, targets = np.random.default_rng(7).integers(0, config.vocab_size, (2, world.size, 4))
    results = {}
    # z1u: the training loop's update_clipped at -z 1 (the norm summed over the ranks on the device,
    # one AdamW launch over this rank's slices, the all-gather), host-staged: the z1 bits
    runs = (("z0", distributed.MpiCommunicator(world), 0, False), ("z1", StreamOrderedMpi(world), 1, False),
            ("z1u", distributed.MpiCommunicator(world), 1, True))
    for name, comm, stage, clipped_on_device in runs:
        layout = zero.ShardLayout(config, world.size, world.rank, stage)
        model = GPT2(config, 1, 4, seed=5, comm=comm, layout=layout)
        model.zero_grad()
        model.forward(tokens[world.rank:world.rank + 1], targets[world.rank:world.rank + 1])
        model.backward(reduce=True)
        if clipped_on_device:
            model.update_clipped(1e-2, weight_decay=0.1, grad_clip=1e9)  # no clipping: as update()'s default
            norm = model.step_results()[1]
        else:
            norm = model.grad_norm()
            model.update(1e-2, weight_decay=0.1)
        state = model.optimizer_state()
        whole = {}
        for key in ("master", "m", "v"):  # every rank's shard, put together in the flat order
            flat = np.zeros(layout.num_parameters, np.float32)
            for rank, part in enumerate(world.allgather(state[key])):
                layout.for_rank(rank).unpack(part, flat)
            whole[key] = flat
        params = world.allgather(state["params_bf16"])
        assert all(np.array_equal(p, params[0]) for p in params), f"{name}: the ranks' parameters differ"
        results.update({f"{name}_params": params[0], f"{name}_norm": norm, f"{name}_loss": comm.all_reduce_host(
            model.losses(), "avg"), **{f"{name}_{k}": v for k, v in whole.items()}})
    if world.rank == 0:
        np.savez(out, tokens=tokens, targets=targets, **results)


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "train":
        train(sys.argv[2], json.loads(sys.argv[3]), *sys.argv[4:])
    elif command == "comm":
        check_communicator()
    elif command == "gpu-model":
        gpu_model(sys.argv[2])
    else:
        raise SystemExit(f"unknown command {command!r}")
