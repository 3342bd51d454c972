"""Training checkpoints as HDF5 files: save, load, find the newest, prune; llm.c's -n/-nk/-nm/-y.

llm.c writes model_%08d.bin (the bf16 parameters) beside state_%08d_%05d.bin (per rank: AdamW m and
v, master weights, RNG and data-loader state) and a DONE_%08d marker. nanollm writes one HDF5 file,
OUT/checkpoint_%08d.h5, readable by hand with h5py or h5dump:

    /                       attrs: format, format_version, step, complete, num_parameters
    /model/params_bf16      (N,) uint16: the parameters as bf16 bits, llm.c's tensor order
    /model                  attrs: config (GPT2Config as JSON), tensors (name, shape, offset as JSON)
    /optimizer              attrs: num_shards, slicing, adamw_step, beta1, beta2, eps
    /optimizer/shard_000    attrs: shard_index, num_shards, offset (of its first element), count
    /optimizer/shard_000/master, m, v   (count,) float32: fp32 master weights, AdamW moments
    /rng                    attrs: seed (stochastic-rounding base seed), sampling (numpy Generator
                            bit_generator.state as JSON)
    /data/train_loader      attrs: state (nanollm.data.DataLoader.state() as JSON)
    /train_config           attrs: config (TrainConfig as JSON)

Every dataset carries attributes dtype, shape, meaning and crc32 (zlib, of its bytes). Optimizer
state is stored per shard, a shard being what one rank keeps under ZeRO-1 (nanollm/zero.py: llm.c's
slicing, every tensor, layer by layer, cut into num_shards equal slices; shard i holds slice i of
each, packed in the flat order). One process, or -z 0 on any number, writes one shard: the whole
state in the flat order. A -z 1 job of N > 1 ranks writes in parallel: rank r > 0 writes its shard
to its own file, OUT/checkpoint_%08d.shard%03dof%03d.SAVEID.h5 (attrs format, step, save_id,
shard_index, num_shards, count, complete; datasets master, m, v), and once every rank's file is
complete (a barrier), rank 0 writes the main file, with shard 0 inside and, for the others,
/optimizer/shard_00r groups whose attrs name the file and the save id. The main file appears last,
so it is the commit: a checkpoint counts only once all its parts are complete. A checkpoint loads
on any number of ranks: with the slicing it was written with, each rank reads only its own shard
(bit for bit); otherwise the state is read whole and sliced again (load_checkpoint(path, layout)).

Writes are atomic: the file is written under a temporary name in the same folder (a dot name
ending .tmp, which no checkpoint pattern matches), flushed and fsynced, renamed over the final name
with os.replace, and the folder fsynced. A crash mid-save leaves every earlier checkpoint intact;
its temp file is removed when that checkpoint is saved again (nanollm/atomic.py).

    python -m nanollm.checkpoint info OUT/checkpoint_00000100.h5
    python -m nanollm.interop convert OUT/checkpoint_00000100.h5 hf_dir/    # export the model (load_model)
"""

import dataclasses
import glob
import json
import os
import re
import sys
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from .atomic import atomic_write_with
from .config import GPT2Config, num_parameters, parameter_shapes
from .zero import ShardLayout

FORMAT = "nanollm-checkpoint"
FORMAT_VERSION = 1
FILENAME = "checkpoint_{step:08d}.h5"
FILENAME_RE = re.compile(r"checkpoint_(\d{8,})\.h5")
SHARD_FORMAT = "nanollm-checkpoint-shard"
SHARD_FILENAME = "checkpoint_{step:08d}.shard{index:03d}of{num_shards:03d}.{save_id}.h5"
SLICING = "zero1: every tensor (the per-layer ones layer by layer) cut into num_shards equal slices, nanollm/zero.py"
ADAMW = {"beta1": 0.9, "beta2": 0.95, "eps": 1e-8}  # the model's and reference's defaults


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and the field."""


class CorruptCheckpointError(CheckpointError):
    """Unreadable, truncated, incomplete or damaged: resume skips it for an older one."""


@dataclass
class Checkpoint:
    step: int                 # optimizer steps taken when saved (the training loop's step)
    model_config: GPT2Config
    params_bf16: np.ndarray   # (N,) uint16 bf16 bits, llm.c order
    master: np.ndarray        # (N,) float32 master weights (or one rank's packed shard, see load_checkpoint)
    m: np.ndarray             # (N,) float32
    v: np.ndarray             # (N,) float32
    adamw_step: int = 0       # AdamW's t (bias correction)
    seed: int = 0             # stochastic-rounding base seed (nanollm.model.GPT2.seed)
    sampling_rng: dict = None  # numpy Generator bit_generator.state
    loader_state: dict = None  # nanollm.data.DataLoader.state()
    train_config: dict = field(default_factory=dict)  # TrainConfig fields
    num_shards: int = 1
    path: str = ""
    save_id: str = ""         # ties a multi-rank save's shard files to its main file

    def optimizer_state(self):
        """The dict GPT2.load_optimizer_state / CpuBackend.load_optimizer_state take."""
        return {"params_bf16": self.params_bf16, "master": self.master, "m": self.m, "v": self.v,
                "step": self.adamw_step, "seed": self.seed}


def checkpoint_path(folder, step):
    return os.path.join(folder, FILENAME.format(step=step))


# ---- writing ------------------------------------------------------------------------------------

def _json(value):
    return json.dumps(value, sort_keys=True)


def _dataset(group, name, data, dtype, meaning):
    data = np.ascontiguousarray(data)
    ds = group.create_dataset(name, data=data)
    ds.attrs["dtype"] = dtype
    ds.attrs["shape"] = np.asarray(data.shape, dtype=np.int64)
    ds.attrs["meaning"] = meaning
    ds.attrs["crc32"] = np.uint32(zlib.crc32(data.view(np.uint8).reshape(-1)))
    return ds


def file_layout(config, num_shards, index=0):
    """The ShardLayout of shard `index` in a file of num_shards shards (one shard: the flat order)."""
    return ShardLayout(config, num_shards, index, 1 if num_shards > 1 else 0)


def shard_filename(step, index, num_shards, save_id):
    return SHARD_FILENAME.format(step=step, index=index, num_shards=num_shards, save_id=save_id)


def _state_datasets(group, layout, master, m, v):
    runs = list(layout.runs())
    where = (f"slice {layout.rank} of {layout.world_size} of every tensor ({len(runs)} runs), packed in the flat order"
             if layout.sharded else "the flat parameter order")
    for name, data, meaning in (("master", master, "fp32 master weights"), ("m", m, "AdamW first moment"),
                                ("v", v, "AdamW second moment")):
        data = np.asarray(data, dtype=np.float32).reshape(-1)
        if data.size != layout.state_size:
            raise ValueError(f"shard {layout.rank} of {layout.world_size}: {name} has {data.size} elements, "
                             f"expected {layout.state_size}")
        _dataset(group, name, data, "float32", f"{meaning}, {where}")


def _shard_attrs(group, layout):
    group.attrs["shard_index"] = layout.rank
    group.attrs["num_shards"] = layout.world_size
    group.attrs["offset"] = next(layout.runs())[0]
    group.attrs["count"] = layout.state_size


def _write(path, ckpt, shards):
    """shards: for each shard index, (master, m, v) packed arrays to store here, or the name of the
    file (beside this one) that holds it, written by its rank under ckpt's save id."""
    import h5py

    config = ckpt.model_config
    n = num_parameters(config)
    num_shards = len(shards)
    with h5py.File(path, "w", libver="earliest") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["step"] = int(ckpt.step)
        f.attrs["num_parameters"] = n
        f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        f.attrs["complete"] = 0  # set to 1 last: a file without it was never finished
        model = f.create_group("model")
        model.attrs["config"] = _json(dataclasses.asdict(config))
        tensors, offset = [], 0
        for name, shape in parameter_shapes(config).items():
            tensors.append([name, list(shape), offset])
            offset += int(np.prod(shape))
        model.attrs["tensors"] = _json(tensors)
        _dataset(model, "params_bf16", np.asarray(ckpt.params_bf16, dtype=np.uint16), "bfloat16 bits in uint16",
                 "model parameters in bf16 (float32 = bits << 16), flat, llm.c tensor order (see /model tensors)")
        opt = f.create_group("optimizer")
        opt.attrs["num_shards"] = num_shards
        opt.attrs["slicing"] = SLICING
        opt.attrs["adamw_step"] = int(ckpt.adamw_step)
        for key, value in ADAMW.items():
            opt.attrs[key] = value
        for index, shard in enumerate(shards):
            layout = file_layout(config, num_shards, index)
            group = opt.create_group(f"shard_{index:03d}")
            _shard_attrs(group, layout)
            if isinstance(shard, str):
                group.attrs["file"] = shard
                group.attrs["save_id"] = ckpt.save_id
            else:
                _state_datasets(group, layout, *shard)
        rng = f.create_group("rng")
        rng.attrs["seed"] = int(ckpt.seed)
        rng.attrs["sampling"] = _json(ckpt.sampling_rng)
        rng.attrs["meaning"] = ("seed: stochastic-rounding base seed of the bf16 update; sampling: the "
                                "text-sampling numpy Generator's bit_generator.state")
        data = f.create_group("data")
        loader = data.create_group("train_loader")
        loader.attrs["state"] = _json(ckpt.loader_state)
        loader.attrs["meaning"] = "nanollm.data.DataLoader.state() of the train loader: the next batch"
        tc = f.create_group("train_config")
        tc.attrs["config"] = _json(ckpt.train_config)
        f.attrs["complete"] = 1
        f.flush()


def _write_shard_file(path, step, layout, save_id, master, m, v):
    import h5py

    with h5py.File(path, "w", libver="earliest") as f:
        f.attrs["format"] = SHARD_FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["step"] = int(step)
        f.attrs["save_id"] = save_id
        f.attrs["complete"] = 0
        _shard_attrs(f, layout)
        _state_datasets(f, layout, master, m, v)
        f.attrs["complete"] = 1
        f.flush()


def save_checkpoint(path, ckpt, num_shards=1):
    """Write ckpt (whole, flat optimizer state) to path atomically (see the module docstring),
    its optimizer state cut into num_shards ZeRO-1 shards, all in this one file."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    shards = [tuple(file_layout(ckpt.model_config, num_shards, i).pack(a) for a in (ckpt.master, ckpt.m, ckpt.v))
              for i in range(num_shards)]
    atomic_write_with(path, lambda tmp_path: _write(tmp_path, ckpt, shards))
    return path


def save_sharded_checkpoint(path, ckpt, layout, comm):
    """Called by every rank of a -z 1 job: ckpt.master/m/v are this rank's packed shard (layout's),
    the rest of ckpt matters on rank 0 only. Ranks > 0 write their shard files; after a barrier
    rank 0 writes the main file (the commit) and deletes the shard files of earlier saves of this
    step; a second barrier returns everyone after the commit. comm: a distributed.Communicator."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    step = int(ckpt.step)
    ckpt.save_id = comm.broadcast_object(os.urandom(4).hex() if comm.rank == 0 else None)
    names = [shard_filename(step, i, layout.world_size, ckpt.save_id) for i in range(layout.world_size)]
    os.makedirs(folder, exist_ok=True)
    if comm.rank > 0:
        atomic_write_with(os.path.join(folder, names[comm.rank]),
                          lambda tmp: _write_shard_file(tmp, step, layout, ckpt.save_id, ckpt.master, ckpt.m, ckpt.v))
    comm.barrier()  # every shard file is complete (a rank that failed has ended the job instead)
    if comm.rank == 0:
        shards = [(ckpt.master, ckpt.m, ckpt.v)] + names[1:]
        atomic_write_with(path, lambda tmp_path: _write(tmp_path, ckpt, shards))
        for stale in _shard_files(folder, step):
            if os.path.basename(stale) not in names:
                _remove(stale)
    comm.barrier()
    return path


def _shard_files(folder, step):
    return glob.glob(os.path.join(glob.escape(folder), f"checkpoint_{step:08d}.shard*.h5"))


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ---- reading ------------------------------------------------------------------------------------

def _attr_name(obj_path, name):
    return ("" if obj_path == "/" else obj_path) + f"/@{name}"


class _Reader:
    """Field access on an open file that turns every failure into a CheckpointError naming it."""

    def __init__(self, path, f):
        self.path, self.f = path, f

    def corrupt(self, field_name, problem):
        return CorruptCheckpointError(f"{self.path}: {field_name}: {problem}")

    def attr(self, obj_path, name):
        field_name = _attr_name(obj_path, name)
        try:
            obj = self.f[obj_path]
        except (KeyError, OSError, RuntimeError) as error:
            raise self.corrupt(obj_path, f"missing ({error})") from None
        if name not in obj.attrs:
            raise self.corrupt(field_name, "missing attribute")
        try:
            value = obj.attrs[name]
        except (OSError, RuntimeError) as error:
            raise self.corrupt(field_name, f"unreadable ({error})") from None
        return value.decode() if isinstance(value, bytes) else value

    def int_attr(self, obj_path, name):
        value = self.attr(obj_path, name)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise self.corrupt(_attr_name(obj_path, name), f"expected an integer, got {value!r}") from None

    def json_attr(self, obj_path, name):
        value = self.attr(obj_path, name)
        try:
            return json.loads(value)
        except (TypeError, ValueError) as error:
            raise self.corrupt(_attr_name(obj_path, name), f"not valid JSON ({error})") from None

    def array(self, ds_path, dtype, size):
        try:
            ds = self.f[ds_path]
        except (KeyError, OSError, RuntimeError) as error:
            raise self.corrupt(ds_path, f"missing dataset ({error})") from None
        if ds.dtype != np.dtype(dtype) or ds.shape != (size,):
            raise self.corrupt(ds_path, f"expected ({size},) {np.dtype(dtype)}, found {ds.shape} {ds.dtype}")
        try:
            data = ds[()]
        except (OSError, RuntimeError, ValueError) as error:
            raise self.corrupt(ds_path, f"unreadable data, the file is truncated or damaged ({error})") from None
        if "crc32" in ds.attrs:
            crc = zlib.crc32(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
            if crc != int(ds.attrs["crc32"]):
                raise self.corrupt(ds_path, f"checksum mismatch (crc32 {crc:#010x}, recorded "
                                            f"{int(ds.attrs['crc32']):#010x}): the data are damaged")
        return data


def _open(path):
    import h5py

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise CorruptCheckpointError(f"{path}: not a readable HDF5 file (truncated or damaged?): {error}") from None


def _read_header(r):
    fmt = r.attr("/", "format")
    if fmt != FORMAT:
        raise r.corrupt("/@format", f"expected {FORMAT!r}, got {fmt!r}: not a nanollm checkpoint")
    version = r.int_attr("/", "format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{r.path}: /@format_version: {version}, but this nanollm reads version "
                              f"{FORMAT_VERSION}")
    if r.int_attr("/", "complete") != 1:
        raise r.corrupt("/@complete", "the checkpoint was never finished (complete = 0)")
    config_dict = r.json_attr("/model", "config")
    try:
        config = GPT2Config(**config_dict)
    except (TypeError, ValueError) as error:
        raise r.corrupt("/model/@config", f"not a valid GPT2Config ({error})") from None
    n = r.int_attr("/", "num_parameters")
    if n != num_parameters(config):
        raise r.corrupt("/@num_parameters", f"{n}, but the model config has {num_parameters(config)}")
    return config, n


def _read_shard(r, index, num_shards, config):
    """(master, m, v) of shard `index`, from this file or from the shard file it names."""
    group = f"/optimizer/shard_{index:03d}"
    layout = file_layout(config, num_shards, index)
    expected = {"shard_index": index, "num_shards": num_shards, "offset": next(layout.runs())[0],
                "count": layout.state_size}
    fields = {k: r.int_attr(group, k) for k in expected}
    if fields != expected:
        raise r.corrupt(group, f"shard attributes {fields} do not match shard {index} of {num_shards} ({expected})")
    if "file" not in r.f[group].attrs:
        return tuple(r.array(f"{group}/{name}", np.float32, layout.state_size) for name in ("master", "m", "v"))
    save_id = r.attr(group, "save_id")
    shard_path = os.path.join(os.path.dirname(os.path.abspath(r.path)), r.attr(group, "file"))
    if not os.path.exists(shard_path):
        raise r.corrupt(f"{group}/@file", f"the shard file {shard_path} is missing")
    with _open(shard_path) as f:
        sr = _Reader(shard_path, f)
        if sr.attr("/", "format") != SHARD_FORMAT or sr.int_attr("/", "complete") != 1:
            raise sr.corrupt("/@format", f"not a complete {SHARD_FORMAT} file")
        found = {k: sr.int_attr("/", k) for k in expected}
        if found != expected or sr.attr("/", "save_id") != save_id or sr.int_attr("/", "step") != r.int_attr("/", "step"):
            raise sr.corrupt("/@save_id", f"this shard file belongs to another save than {r.path} "
                                          f"(save id {sr.attr('/', 'save_id')!r}, expected {save_id!r}; {found})")
        return tuple(sr.array(f"/{name}", np.float32, layout.state_size) for name in ("master", "m", "v"))


def load_checkpoint(path, layout=None):
    """Read and check a checkpoint written by save_checkpoint or save_sharded_checkpoint; returns a
    Checkpoint. layout None: master, m and v whole, in the flat order (every shard read). layout a
    zero.ShardLayout (one rank of a job): master, m and v are that rank's packed state, read from its
    own shard when the file was cut the same way, otherwise read whole and cut again (a job resumed
    on another number of ranks, or at another -z)."""
    path = os.fspath(path)
    f = _open(path)
    with f:
        r = _Reader(path, f)
        config, n = _read_header(r)
        if layout is not None and layout.config != config:
            raise CheckpointError(f"{path}: /model/@config: the checkpoint holds {config}, but this job's model is "
                                  f"{layout.config}")
        num_shards = r.int_attr("/optimizer", "num_shards")
        if num_shards < 1:
            raise r.corrupt("/optimizer/@num_shards", f"{num_shards}; at least 1")
        if layout is not None and layout.parts == num_shards:  # this rank's shard is stored as it is needed
            master, m, v = _read_shard(r, layout.rank if layout.sharded else 0, num_shards, config)
        else:
            master, m, v = (np.empty(n, np.float32) for _ in range(3))
            for index in range(num_shards):
                shard_layout = file_layout(config, num_shards, index)
                for whole, part in zip((master, m, v), _read_shard(r, index, num_shards, config)):
                    shard_layout.unpack(part, whole)
            if layout is not None:
                master, m, v = (layout.pack(a) for a in (master, m, v))
        return Checkpoint(
            step=r.int_attr("/", "step"),
            model_config=config,
            params_bf16=r.array("/model/params_bf16", np.uint16, n),
            master=master, m=m, v=v,
            adamw_step=r.int_attr("/optimizer", "adamw_step"),
            seed=r.int_attr("/rng", "seed"),
            sampling_rng=r.json_attr("/rng", "sampling"),
            loader_state=r.json_attr("/data/train_loader", "state"),
            train_config=r.json_attr("/train_config", "config"),
            num_shards=num_shards,
            path=path,
        )


def load_model(path, master=False):
    """(GPT2Config, flat float32 parameters in llm.c's order) of a checkpoint, for export and
    evaluation, whatever number of ranks wrote it: its bf16 parameters (what the GPU model computes
    with, and what llm.c's checkpoints hold as model_%08d.bin), or with master=True the fp32 master
    weights (what the CPU path computes with)."""
    path = os.fspath(path)
    with _open(path) as f:
        r = _Reader(path, f)
        config, n = _read_header(r)
        if not master:
            from .kernels.bf16 import from_bf16_bits

            return config, from_bf16_bits(r.array("/model/params_bf16", np.uint16, n))
    return config, load_checkpoint(path).master  # every shard, in the flat order


# ---- the checkpoint folder ------------------------------------------------------------------------

def list_checkpoints(folder):
    """[(step, path)] of the files named like checkpoints in folder, oldest first. Temporary files
    (".checkpoint_...tmp") never match."""
    if not folder or not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = FILENAME_RE.fullmatch(name)
        if match:
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


def latest_checkpoint(folder, layout=None, warn=None, agree=None):
    """The newest checkpoint in folder that loads and checks out (load_checkpoint(path, layout)), or
    None. A damaged or unfinished newer file is skipped with a warning (through warn, default
    stderr) for the one before it. agree: in a job of several ranks, a function that takes this
    rank's problem with a candidate (None if it loaded) and returns every rank's
    (Communicator.all_gather_object), so that all ranks skip the same files and resume together."""
    warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))
    agree = agree or (lambda problem: [problem])
    for step, path in reversed(list_checkpoints(folder)):
        problem, ckpt = None, None
        try:
            ckpt = load_checkpoint(path, layout)
        except CorruptCheckpointError as error:
            problem = str(error)
        if ckpt is not None and ckpt.step != step:
            problem = f"{path}: /@step: {ckpt.step}, but the name says {step}"
        problems = [p for p in agree(problem) if p]
        if problems:
            for text in dict.fromkeys(problems):
                warn(f"warning: skipping checkpoint {text}")
            continue
        return ckpt
    return None


def prune_checkpoints(folder, keep, major_every=0):
    """llm.c's -nk/-nm: keep the `keep` newest checkpoints (0 = all) and every major one (step a
    multiple of major_every > 0); delete the rest. Returns the deleted paths."""
    if keep <= 0:
        return []
    deleted = []
    for step, path in list_checkpoints(folder)[:-keep]:
        if major_every > 0 and step % major_every == 0:
            continue
        os.remove(path)  # first the main file: from here on the checkpoint does not count
        for shard in _shard_files(folder, step):
            _remove(shard)
        deleted.append(path)
    return deleted


# ---- python -m nanollm.checkpoint info PATH ----------------------------------------------------------

def _size(nbytes):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1024


def info(path):
    """A summary of a checkpoint (it is loaded and checked in full first)."""
    import h5py

    ckpt = load_checkpoint(path)  # checks every shard
    c = ckpt.model_config
    shards = []
    with h5py.File(path, "r") as f:
        for index in range(ckpt.num_shards):
            name = f[f"optimizer/shard_{index:03d}"].attrs.get("file")
            where = "in this file" if name is None else \
                f"in {name} ({_size(os.path.getsize(os.path.join(os.path.dirname(os.path.abspath(path)), name)))})"
            shards.append(f"  shard {index}: {int(f[f'optimizer/shard_{index:03d}'].attrs['count']):,} elements {where}")
    lines = [
        f"{path}: {FORMAT} version {FORMAT_VERSION}, {_size(os.path.getsize(path))}",
        f"step {ckpt.step} (AdamW step {ckpt.adamw_step}), optimizer shards: {ckpt.num_shards}"
        + (" (ZeRO-1 slices of every tensor, one per rank)" if ckpt.num_shards > 1 else ""),
        *shards,
        f"model: L={c.num_layers} C={c.channels} NH={c.num_heads} V={c.vocab_size} (padded {c.padded_vocab_size}) "
        f"maxT={c.max_seq_len}, {num_parameters(c):,} parameters",
    ]
    tc = ckpt.train_config
    if tc:
        lines.append("train config: " + ", ".join(f"{k}={tc[k]!r}" for k in sorted(tc)))
    ls = ckpt.loader_state or {}
    if ls:
        lines.append(f"train loader: epoch {ls.get('epoch')}, shard {ls.get('shard_idx')} of {ls.get('num_shards')}, "
                     f"next sample {ls.get('sample_idx')}, B={ls.get('B')} T={ls.get('T')} "
                     f"world_size={ls.get('world_size')} seed={ls.get('seed')}")
    lines.append(f"rng: stochastic-rounding seed {ckpt.seed}, sampling generator "
                 f"{(ckpt.sampling_rng or {}).get('bit_generator')}")
    lines.append("datasets:")
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                lines.append(f"  /{name:<28} {str(obj.shape):<14} {obj.dtype!s:<8} {_size(obj.nbytes):>10}  "
                             f"{obj.attrs.get('dtype', '')}")
        f.visititems(visit)
    return "\n".join(lines)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m nanollm.checkpoint",
                                     description="Inspect nanollm's HDF5 training checkpoints (-n). To export the "
                                                 "model: python -m nanollm.interop convert CHECKPOINT.h5 OUT")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="check a checkpoint in full and summarise it").add_argument("path", metavar="PATH")
    args = parser.parse_args(argv)  # exits 2 on a bad command line, 0 for --help
    try:
        print(info(args.path))
    except (CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
