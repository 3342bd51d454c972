"""Several processes training one model: who is who (the World) and how they talk (communicators).

    mpirun -np 8 python -m nanollm.train ...      # Open MPI, MPICH; `srun python -m nanollm.train` under Slurm

A process learns it is one of several from its launcher's environment (OMPI_COMM_WORLD_SIZE,
PMI_SIZE, SLURM_STEP_NUM_TASKS, ...); only then is mpi4py imported and MPI started, so a plain
`python -m nanollm.train` needs no MPI library at all. The World holds the rank, the number of
ranks, the local rank (MPI's shared-memory split: the ranks on this host), which picks the GPU,
and the host names.

Communicators share one small interface (llm.c's zero.cuh does the same with NCCL alone):
- arrays, changed in place: all_reduce (sum/avg/max/min), reduce_scatter (the array's N equal
  chunks; chunk `rank` gets the reduction), all_gather (every rank's chunk to all), broadcast.
  On the GPU they take device arrays (uint16 holds bf16 bits, as everywhere in nanollm) and the
  stream whose work they follow; on the CPU path numpy float32 arrays.
- host values any code can use to agree on a flag or a count (stop requested on any rank, a
  summed eval count, the loss): all_reduce_host, any, all_gather_object, broadcast_object;
  and barrier, abort.
Implementations: SingleProcess (one rank: nothing to do), MpiCommunicator (mpi4py; device arrays
go through the host), NcclCommunicator (nccl4py: the unique id broadcast over MPI, then the raw
nccl.bindings.nccl collectives on device pointers, queued on a CUDA stream, so they can overlap
compute and be captured in CUDA graphs). NCCL refuses two ranks on one GPU, so ranks that share a
GPU use the MPI communicator (how the sharded path is tested on one GPU).

Faults: once the ranks are started, an exception in any rank ends the whole job (abort_job:
the error on that rank's stderr, NCCL's communicator aborted, MPI_Abort), so no rank waits for a
dead peer forever.
"""

import contextlib
import os
import socket
import sys
import threading
import time
import traceback

import numpy as np

from .train_config import UsageError

# (variable giving the number of processes, launcher) in the order they are looked for
LAUNCHER_VARIABLES = (
    ("OMPI_COMM_WORLD_SIZE", "Open MPI"),
    ("PMI_SIZE", "MPICH / Intel MPI"),
    ("MV2_COMM_WORLD_SIZE", "MVAPICH"),
    ("SLURM_STEP_NUM_TASKS", "Slurm srun"),
)
OPS = ("sum", "avg", "max", "min")


def launcher_world_size(environ=None):
    """(number of processes, what said so) from the launcher's environment; (1, "") without one."""
    environ = os.environ if environ is None else environ
    for variable, launcher in LAUNCHER_VARIABLES:
        value = environ.get(variable, "")
        if value.isdigit() and int(value) > 1:
            return int(value), f"{launcher}: {variable}={value}"
    return 1, ""


class World:
    """This process's place among the ranks. Without a launcher: rank 0 of 1, no MPI."""

    def __init__(self, rank=0, size=1, local_rank=0, local_size=1, hosts=None, mpi=None, launcher=""):
        self.rank, self.size = rank, size
        self.local_rank, self.local_size = local_rank, local_size
        self.hosts = hosts or [socket.gethostname()]
        self.mpi = mpi  # mpi4py's COMM_WORLD, or None for one process
        self.launcher = launcher

    def allgather(self, obj):
        return self.mpi.allgather(obj) if self.mpi is not None else [obj]

    def bcast(self, obj, root=0):
        return self.mpi.bcast(obj, root=root) if self.mpi is not None else obj

    def check_same_settings(self, settings):
        """Every rank must run with rank 0's settings (a dict); a rank that differs raises."""
        if self.size == 1:
            return
        reference = self.bcast(settings)
        differing = [f"{name} {settings.get(name)!r} (rank 0: {value!r})" for name, value in reference.items()
                     if settings.get(name) != value]
        if differing:
            raise UsageError(f"rank {self.rank} was started with other settings than rank 0: {'; '.join(differing)}")

    def abort(self, code):
        if self.mpi is not None:
            self.mpi.Abort(code)
        os._exit(code)


def init_world(environ=None):
    """The World of this process: MPI is started only when a launcher started several processes."""
    size, source = launcher_world_size(environ)
    if size == 1:
        return World()
    try:
        from mpi4py import MPI
    except Exception as error:  # ImportError, or RuntimeError when no MPI library loads
        raise UsageError(f"this process is one of {size} ({source}), but mpi4py cannot start MPI: {error}") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != size:
        library = MPI.Get_library_version().strip().splitlines()[0]
        raise UsageError(f"this process is one of {size} ({source}), but MPI sees {comm.Get_size()}: mpi4py loaded "
                         f"another MPI library than the launcher's ({library})")
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    world = World(comm.Get_rank(), size, local.Get_rank(), local.Get_size(), None, comm, source)
    world.hosts = comm.allgather(MPI.Get_processor_name())
    local.Free()
    return world


# ---- communicators -------------------------------------------------------------------------------------

class Communicator:
    """The interface (see the module docstring). Host-value methods work for every kind."""

    name = "none"
    stream_ordered = False  # collectives queue on a CUDA stream (NCCL) instead of running at the call

    def __init__(self, world):
        self.world = world
        self.rank, self.size = world.rank, world.size

    @property
    def active(self):
        """Whether collectives do anything (False only for SingleProcess)."""
        return True

    # host values
    def all_reduce_host(self, value, op="sum"):
        """A float or numpy array reduced over the ranks (float64 sums), returned."""
        if self.world.mpi is None:
            return value
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        array = np.array(value, dtype=np.float64).reshape(-1)
        total = np.empty_like(array)
        self.world.mpi.Allreduce(array, total, op=_mpi_op(op))
        if op == "avg":
            total /= self.size
        return float(total[0]) if np.ndim(value) == 0 else total.reshape(np.shape(value))

    def any(self, flag):
        """True on every rank if `flag` is true on any (e.g. a stop request seen by one rank)."""
        return bool(self.all_reduce_host(1.0 if flag else 0.0, "max"))

    def broadcast_object(self, obj, root=0):
        return self.world.bcast(obj, root)

    def all_gather_object(self, obj):
        """[every rank's obj], rank order (any picklable value)."""
        return self.world.allgather(obj)

    def barrier(self):
        if self.world.mpi is not None:
            self.world.mpi.Barrier()

    def abort(self):
        """Cancel this rank's in-flight collectives (NCCL); the job is ended by abort_job."""

    def close(self):
        pass

    @contextlib.contextmanager
    def group(self):
        """Collectives issued inside run as one (NCCL's group); elsewhere a no-op."""
        yield

    # arrays
    def all_reduce(self, array, op="avg", stream=0):
        raise NotImplementedError

    def reduce_scatter(self, array, op="avg", stream=0):
        raise NotImplementedError

    def all_gather(self, array, stream=0):
        raise NotImplementedError

    def broadcast(self, array, root=0, stream=0):
        raise NotImplementedError

    def _chunk(self, array):
        if array.size % self.size:
            raise ValueError(f"{array.size} elements do not split into {self.size} equal chunks")
        return array.size // self.size


class SingleProcess(Communicator):
    """One rank: every collective leaves its array as it is."""

    name = "none"

    @property
    def active(self):
        return False

    def all_reduce(self, array, op="avg", stream=0):
        pass

    def reduce_scatter(self, array, op="avg", stream=0):
        pass

    def all_gather(self, array, stream=0):
        pass

    def broadcast(self, array, root=0, stream=0):
        pass


def _mpi_op(op):
    from mpi4py import MPI

    return {"sum": MPI.SUM, "avg": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]


def _is_device_array(array):
    return not isinstance(array, np.ndarray)


class MpiCommunicator(Communicator):
    """mpi4py collectives. numpy arrays are used in place; a device array is copied to the host
    after its stream's work (a host synchronisation), reduced there in float32 (bf16 widened
    first, the result rounded to nearest even) and copied back: slow, but it needs no NCCL and
    works for ranks sharing a GPU."""

    name = "mpi"

    def __init__(self, world):
        if world.mpi is None:
            raise ValueError("MpiCommunicator needs a world started by an MPI launcher (one process: SingleProcess)")
        super().__init__(world)

    @staticmethod
    def _to_host(array, stream):
        """(the array itself if on the host, else a host copy taken after `stream`'s work, dtype)."""
        if not _is_device_array(array):
            return array, array.dtype
        if not isinstance(stream, int):
            stream.synchronize()
        host = array.copy_to_host()  # on the legacy stream, which waits for blocking streams' work too
        return host, host.dtype

    @staticmethod
    def _widen(host):
        if host.dtype == np.uint16:
            from .kernels.bf16 import from_bf16_bits

            return from_bf16_bits(host)
        if host.dtype != np.float32:
            raise TypeError(f"reductions take float32 or bf16 (uint16) arrays, got {host.dtype}")
        return host

    @staticmethod
    def _narrow(values, dtype):
        if dtype == np.uint16:
            from .kernels.bf16 import to_bf16_bits

            return to_bf16_bits(values)
        return values

    def _reduce(self, values, op):
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        if op == "avg":
            values /= np.float32(self.size)
        return values

    def all_reduce(self, array, op="avg", stream=0):
        from mpi4py import MPI

        host, dtype = self._to_host(array, stream)
        values = self._widen(host)  # numpy float32 arrays are reduced in place
        self.world.mpi.Allreduce(MPI.IN_PLACE, values, op=_mpi_op(op))
        self._reduce(values, op)
        if _is_device_array(array):
            array.copy_to_device(np.ascontiguousarray(self._narrow(values, dtype)))

    def reduce_scatter(self, array, op="avg", stream=0):
        count = self._chunk(array)
        host, dtype = self._to_host(array, stream)
        values = self._widen(host)
        mine = np.empty(count, np.float32)
        self.world.mpi.Reduce_scatter_block(values, mine, op=_mpi_op(op))
        self._reduce(mine, op)
        chunk = slice(self.rank * count, (self.rank + 1) * count)
        if _is_device_array(array):
            array[chunk].copy_to_device(np.ascontiguousarray(self._narrow(mine, dtype)))
        else:
            array[chunk] = mine

    def all_gather(self, array, stream=0):
        from mpi4py import MPI

        self._chunk(array)
        host, _ = self._to_host(array, stream)  # raw bits: gathering moves values, nothing to round
        self.world.mpi.Allgather(MPI.IN_PLACE, host)
        if _is_device_array(array):
            array.copy_to_device(host)

    def broadcast(self, array, root=0, stream=0):
        host, _ = self._to_host(array, stream)
        self.world.mpi.Bcast(host, root=root)
        if _is_device_array(array):
            array.copy_to_device(host)


class NcclCommunicator(Communicator):
    """NCCL through nccl4py on device arrays, queued on the given stream (DESIGN.md, "Verified": the
    high-level nccl4py calls resolve Numba arrays through CuPy's current device and are refused on
    every GPU but 0, so the raw bindings take the pointers)."""

    name = "nccl"
    stream_ordered = True
    DTYPES = {np.dtype(np.uint16): 9, np.dtype(np.float32): 7}  # ncclBfloat16, ncclFloat32
    OPS = {"sum": 0, "max": 2, "min": 3, "avg": 4}

    def __init__(self, world):
        super().__init__(world)
        from . import cuda_libraries

        # this environment's NCCL (nvidia-nccl-cu13) before nccl4py looks for one: a missing library
        # is a clear MissingCudaLibrary naming the package, and the file is printed at start-up
        self.library = cuda_libraries.load("nccl")
        from nccl import core
        from nccl.bindings import nccl as raw

        self.raw = raw
        unique_id = core.get_unique_id().as_bytes if world.rank == 0 else None
        unique_id = world.bcast(unique_id)
        self.owner = core.Communicator.init(world.size, world.rank, core.UniqueId.from_bytes(unique_id))
        self.handle = self.owner._comm  # the raw bindings take nccl4py's Comm object
        _live_nccl.append(self)

    def _pointer_and_type(self, array):
        from .kernels.cuda_common import device_pointer

        if array.dtype not in self.DTYPES:
            raise TypeError(f"NCCL collectives take float32 or bf16 (uint16) arrays, got {array.dtype}")
        return device_pointer(array), self.DTYPES[array.dtype], array.dtype.itemsize

    @staticmethod
    def _stream(stream):
        from .kernels.cuda_common import stream_handle

        return stream_handle(stream)

    def all_reduce(self, array, op="avg", stream=0):
        pointer, dtype, _ = self._pointer_and_type(array)
        self.raw.all_reduce(pointer, pointer, array.size, dtype, self.OPS[op], self.handle, self._stream(stream))

    def reduce_scatter(self, array, op="avg", stream=0):
        count = self._chunk(array)
        pointer, dtype, itemsize = self._pointer_and_type(array)
        # in place: NCCL's rule is recvbuff == sendbuff + rank * recvcount
        self.raw.reduce_scatter(pointer, pointer + self.rank * count * itemsize, count, dtype, self.OPS[op],
                                self.handle, self._stream(stream))

    def all_gather(self, array, stream=0):
        count = self._chunk(array)
        pointer, dtype, itemsize = self._pointer_and_type(array)
        # in place: sendbuff == recvbuff + rank * sendcount
        self.raw.all_gather(pointer + self.rank * count * itemsize, pointer, count, dtype, self.handle,
                            self._stream(stream))

    def broadcast(self, array, root=0, stream=0):
        pointer, dtype, _ = self._pointer_and_type(array)
        self.raw.broadcast(pointer, pointer, array.size, dtype, root, self.handle, self._stream(stream))

    @contextlib.contextmanager
    def group(self):
        self.raw.group_start()
        try:
            yield
        finally:
            self.raw.group_end()

    def abort(self):
        if self in _live_nccl:
            _live_nccl.remove(self)
            self.raw.comm_abort(self.handle)

    def close(self):
        if self in _live_nccl:
            _live_nccl.remove(self)
            self.owner.destroy()


_live_nccl = []  # NCCL communicators to abort if this rank fails


def select_gpu(world):
    """Make the GPU of this rank's local rank current (before any other CUDA call of this
    process). Returns (GPU index, GPUs on this host, name)."""
    from numba import cuda

    count = len(cuda.gpus)
    index = world.local_rank % count
    cuda.select_device(index)
    name = getattr(cuda.get_current_device(), "name", "CUDA simulator")  # the simulator's device has none
    return index, count, name.decode() if isinstance(name, bytes) else str(name)


def make_communicator(world, requested, device, gpus_on_host=0):
    """--comm auto|nccl|mpi for this world. auto: NCCL when every rank has its own GPU, else MPI
    (the CPU path, or ranks sharing a GPU). One process: SingleProcess, except --comm nccl (a
    one-rank NCCL communicator: the same code path as several GPUs, for measuring it)."""
    shared = device == "cuda" and world.local_size > gpus_on_host
    if requested == "nccl":
        if device != "cuda":
            raise UsageError("--comm nccl needs GPUs, but this run trains on the CPU; use --comm mpi (or auto)")
        if shared:
            raise UsageError(f"--comm nccl: {world.local_size} ranks on host {world.hosts[world.rank]} share "
                             f"{gpus_on_host} GPU(s), and NCCL refuses two ranks on one GPU; use --comm mpi")
        return NcclCommunicator(world)
    if world.size == 1:
        return SingleProcess(world)
    if requested == "auto" and device == "cuda" and not shared:
        return NcclCommunicator(world)
    return MpiCommunicator(world)


def describe_ranks(world, placements):
    """The start-up line: ranks -> host and GPU (placements: every rank's "GPU i (name)" or "CPU")."""
    where = ", ".join(f"{rank} -> {host} {place}" for rank, (host, place) in enumerate(zip(world.hosts, placements)))
    launcher = f" ({world.launcher})" if world.launcher else ""
    return f"{world.size} process{'es' if world.size > 1 else ''}{launcher}: rank {where}"


def abort_job(world, error, exit_code):
    """End every rank because this one failed: its error on stderr, NCCL aborted, MPI_Abort."""
    if exit_code == 2:
        message = f"error (rank {world.rank} of {world.size}): {error}\n"
    else:
        message = (f"error (rank {world.rank} of {world.size}, host {world.hosts[world.rank]}), ending the job:\n"
                   + "".join(traceback.format_exception(type(error), error, error.__traceback__)))
    sys.stderr.write(message)
    sys.stderr.flush()
    sys.stdout.flush()
    for comm in list(_live_nccl):  # bounded: a stuck abort must not keep the job alive
        thread = threading.Thread(target=comm.abort, daemon=True)
        thread.start()
        thread.join(5.0)
    # The launcher forwards our stderr through a pipe but acts on MPI_Abort through its control socket;
    # MPICH's hydra sometimes handled the abort first and killed the job with the message still in the
    # pipe (1 run in 8 on two cores). A second is enough for it to forward what was written.
    if world.size > 1:
        time.sleep(1.0)
    world.abort(exit_code)
