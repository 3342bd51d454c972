"""Model interop: llm.c's model files (.bin) and Hugging Face GPT-2 directories.

Parameters travel as one flat float32 array in llm.c's order (config.parameter_shapes), the same
layout as nanollm's own parameter buffer, with wte padded to Vp rows.

llm.c model file (train_gpt2.py write_model, train_gpt2.cu gpt2_build_from_checkpoint): a header
of 256 little-endian int32, [0]=20240326, [1]=version, [2]=maxT, [3]=V, [4]=L, [5]=NH, [6]=C,
[7]=Vp, then every tensor in llm.c's order, back to back, nothing after. Version 3: all tensors
fp32; version 5: all tensors bf16 (layernorms included). Older versions are not read: 1 (fp32)
and 2 (bf16) predate the padded vocabulary (no Vp, wte has V rows) and 4 kept the layernorms
in fp32; llm.c itself refuses them and asks for a re-export.

Hugging Face GPT-2 directory: config.json + model.safetensors (or a sharded
model.safetensors.index.json), as GPT2LMHeadModel.save_pretrained writes it. HF's GPT-2 uses
Conv1D layers whose weights are stored (in, out): they are transposed to llm.c's (out, in). The
lm head is tied to wte, as in llm.c. Only `safetensors.numpy` is used, so no torch import.

Command line: python -m nanollm.interop convert IN OUT [--dtype fp32|bf16] [--weights bf16|master]
IN/OUT ending in .bin are llm.c files, anything else an HF directory; IN may also be a nanollm
training checkpoint (.h5): its bf16 parameters (what the GPU model computes with; llm.c's
checkpoints hold the same) or, with --weights master, its fp32 master weights.
"""

import argparse
import json
import math
import os
import sys

import numpy as np

from .atomic import atomic_write_with as _atomic_write
from .config import GPT2Config, num_parameters, parameter_shapes

MODEL_MAGIC = 20240326
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VERSION_FP32 = 3
VERSION_BF16 = 5
VERSION_BYTES = {VERSION_FP32: 4, VERSION_BF16: 2}
OLD_VERSIONS = {
    1: "fp32 from before the padded vocabulary",
    2: "bf16 from before the padded vocabulary",
    4: "bf16 with fp32 layernorms, superseded by version 5",
}
VOCAB_PAD_MULTIPLE = 128  # llm.c's pad_vocab: 50257 -> 50304
CHUNK = 1 << 22           # elements per read/convert/write step, bounds the temporaries

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_PREFIX = "transformer."


class InteropError(ValueError):
    """A model file or directory that cannot be read or written; the message names it."""


def padded_vocab_size(vocab_size, multiple=VOCAB_PAD_MULTIPLE):
    return ((vocab_size + multiple - 1) // multiple) * multiple


def _check_flat(config, flat_params, what):
    flat = np.asarray(flat_params)
    if flat.ndim != 1 or flat.size != num_parameters(config):
        raise InteropError(f"{what}: flat_params must be 1-D with {num_parameters(config)} elements "
                           f"(num_parameters of {config}), got shape {flat.shape}")
    return flat


def _views(config, flat):
    """Name -> view of flat in llm.c's order."""
    views, offset = {}, 0
    for name, shape in parameter_shapes(config).items():
        size = math.prod(shape)
        views[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    return views


# ---- llm.c model files -----------------------------------------------------------------------

def _config_from_header(path, header):
    maxT, V, L, NH, C, Vp = (int(x) for x in header[2:8])
    fields = dict(max_seq_len=maxT, vocab_size=V, num_layers=L, num_heads=NH, channels=C, padded_vocab_size=Vp)
    bad = [f"{k}={v}" for k, v in fields.items() if v < 1]
    if bad:
        raise InteropError(f"{path}: inconsistent model header: {', '.join(bad)} (must be positive)")
    if C % NH != 0:
        raise InteropError(f"{path}: inconsistent model header: channels C={C} is not a multiple of num_heads NH={NH}")
    if Vp < V:
        raise InteropError(f"{path}: inconsistent model header: padded vocab Vp={Vp} < vocab V={V}")
    return GPT2Config(**fields)


def read_llmc_header(path):
    """(GPT2Config, version) from an llm.c model file's header, checking the file's size."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
        size = os.fstat(f.fileno()).st_size
    if len(raw) < HEADER_BYTES:
        raise InteropError(f"{path}: truncated: {len(raw)} bytes, shorter than the {HEADER_BYTES}-byte model header")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != MODEL_MAGIC:
        raise InteropError(f"{path}: bad magic {int(header[0])} (expected {MODEL_MAGIC}): not an llm.c model file")
    version = int(header[1])
    if version not in VERSION_BYTES:
        hint = f" ({OLD_VERSIONS[version]}; re-export it with llm.c's train_gpt2.py)" if version in OLD_VERSIONS else ""
        raise InteropError(f"{path}: unsupported model file version {version}{hint}; "
                           f"readable: {VERSION_FP32} (fp32) and {VERSION_BF16} (bf16)")
    config = _config_from_header(path, header)
    expected = HEADER_BYTES + num_parameters(config) * VERSION_BYTES[version]
    if size != expected:
        kind = "truncated" if size < expected else "has trailing bytes"
        raise InteropError(f"{path}: {kind}: {size} bytes, but the header ({config}, version {version}) "
                           f"implies {expected}")
    return config, version


def read_llmc_model(path):
    """llm.c model file -> (GPT2Config, flat float32 parameters in llm.c's order).
    bf16 files (version 5) are widened exactly to float32."""
    path = os.fspath(path)
    config, version = read_llmc_header(path)
    n = num_parameters(config)
    flat = np.empty(n, dtype=np.float32)
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        if version == VERSION_FP32:
            got = f.readinto(memoryview(flat.view(np.uint8)))
            if got != 4 * n:
                raise InteropError(f"{path}: truncated while reading: got {got} of {4 * n} parameter bytes")
        else:
            from .kernels.bf16 import from_bf16_bits

            bits = np.empty(min(CHUNK, n), dtype=np.uint16)
            for start in range(0, n, CHUNK):
                count = min(CHUNK, n - start)
                got = f.readinto(memoryview(bits[:count].view(np.uint8)))
                if got != 2 * count:
                    raise InteropError(f"{path}: truncated while reading parameters")
                flat[start:start + count] = from_bf16_bits(bits[:count])
    return config, flat


def write_llmc_model(path, config, flat_params, version=VERSION_BF16):
    """Writes an llm.c model file atomically: version 3 stores fp32, version 5 bf16 (float32
    rounded to nearest even, NaN kept NaN), as llm.c's train_gpt2.py write_model."""
    path = os.fspath(path)
    if version not in VERSION_BYTES:
        raise InteropError(f"{path}: cannot write model file version {version!r}: "
                           f"use {VERSION_FP32} (fp32) or {VERSION_BF16} (bf16)")
    flat = _check_flat(config, flat_params, path)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = (MODEL_MAGIC, version, config.max_seq_len, config.vocab_size, config.num_layers,
                  config.num_heads, config.channels, config.padded_vocab_size)
    if version == VERSION_BF16:
        from .kernels.bf16 import to_bf16_bits

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            for start in range(0, flat.size, CHUNK):
                chunk = np.asarray(flat[start:start + CHUNK], dtype=np.float32)
                if version == VERSION_BF16:
                    f.write(to_bf16_bits(chunk).astype("<u2", copy=False).tobytes())
                else:
                    f.write(chunk.astype("<f4", copy=False).tobytes())

    _atomic_write(path, write)


# ---- Hugging Face GPT-2 ----------------------------------------------------------------------

# llm.c name -> (HF name per layer or global, HF stores it (in, out) and it must be transposed)
_HF_LAYER_NAMES = {
    "ln1w": ("ln_1.weight", False),
    "ln1b": ("ln_1.bias", False),
    "qkvw": ("attn.c_attn.weight", True),
    "qkvb": ("attn.c_attn.bias", False),
    "attprojw": ("attn.c_proj.weight", True),
    "attprojb": ("attn.c_proj.bias", False),
    "ln2w": ("ln_2.weight", False),
    "ln2b": ("ln_2.bias", False),
    "fcw": ("mlp.c_fc.weight", True),
    "fcb": ("mlp.c_fc.bias", False),
    "fcprojw": ("mlp.c_proj.weight", True),
    "fcprojb": ("mlp.c_proj.bias", False),
}
_HF_GLOBAL_NAMES = {"wte": "wte.weight", "wpe": "wpe.weight", "lnfw": "ln_f.weight", "lnfb": "ln_f.bias"}


def _hf_config_to_gpt2(directory, hf):
    where = os.path.join(directory, HF_CONFIG)

    def get(*keys, default=None):
        for key in keys:
            if key in hf and hf[key] is not None:
                return hf[key]
        if default is not None:
            return default
        raise InteropError(f"{where}: missing {' / '.join(keys)}")

    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise InteropError(f"{where}: model_type {model_type!r} is not 'gpt2'")
    C = int(get("n_embd", "hidden_size"))
    L = int(get("n_layer", "num_hidden_layers"))
    NH = int(get("n_head", "num_attention_heads"))
    maxT = int(get("n_positions", "n_ctx", "max_position_embeddings"))
    V = int(get("vocab_size"))
    # the pieces of HF's GPT-2 that llm.c's model does not have: refuse rather than convert wrongly
    checks = [
        (hf.get("n_inner") in (None, 4 * C), f"n_inner={hf.get('n_inner')} (llm.c's MLP is 4*C={4 * C})"),
        (hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
         f"activation_function={hf.get('activation_function')!r} (llm.c uses the tanh GELU, gelu_new)"),
        (abs(float(hf.get("layer_norm_epsilon", 1e-5)) - 1e-5) <= 1e-12,
         f"layer_norm_epsilon={hf.get('layer_norm_epsilon')} (llm.c uses 1e-5)"),
        (hf.get("scale_attn_weights", True), "scale_attn_weights=false"),
        (not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true"),
        (not hf.get("add_cross_attention", False), "add_cross_attention=true"),
    ]
    bad = [msg for ok, msg in checks if not ok]
    if bad:
        raise InteropError(f"{where}: not convertible to llm.c's GPT-2: {'; '.join(bad)}")
    try:
        return GPT2Config(max_seq_len=maxT, vocab_size=V, padded_vocab_size=padded_vocab_size(V),
                          num_layers=L, num_heads=NH, channels=C)
    except ValueError as e:
        raise InteropError(f"{where}: {e}") from None


def _load_safetensors(path):
    """name -> numpy array; bf16 tensors (which numpy cannot name) are widened to float32."""
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except TypeError as e:
        if "bfloat16" not in str(e):
            raise
    # safetensors layout: u64 little-endian header length, JSON header, then the raw data
    from .kernels.bf16 import from_bf16_bits

    dtypes = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
    with open(path, "rb") as f:
        (length,) = np.frombuffer(f.read(8), dtype="<u8")
        header = json.loads(f.read(int(length)))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise InteropError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        array = np.frombuffer(data[begin:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
        out[name] = from_bf16_bits(array) if info["dtype"] == "BF16" else array
    return out


def _load_hf_tensors(directory):
    single = os.path.join(directory, HF_WEIGHTS)
    index = os.path.join(directory, HF_INDEX)
    if os.path.isfile(single):
        return _load_safetensors(single)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(directory, shard)
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"{shard_path}: shard named in {index} is missing")
            tensors.update(_load_safetensors(shard_path))
        return tensors
    other = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack") if os.path.exists(os.path.join(directory, n))]
    hint = f" (found {', '.join(other)}: re-save with save_pretrained(safe_serialization=True))" if other else ""
    raise FileNotFoundError(f"{single}: no such file, and no {HF_INDEX} either{hint}")


def import_hf_gpt2(directory):
    """Hugging Face GPT-2 directory (config.json + model.safetensors) -> (GPT2Config, flat float32
    parameters in llm.c's order), wte padded with zero rows to Vp = V rounded up to 128."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: not a directory (expected a Hugging Face GPT-2 model directory)")
    config_path = os.path.join(directory, HF_CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: no such file")
    with open(config_path) as f:
        try:
            hf_config = json.load(f)
        except json.JSONDecodeError as e:
            raise InteropError(f"{config_path}: not valid JSON: {e}") from None
    config = _hf_config_to_gpt2(directory, hf_config)
    tensors = _load_hf_tensors(directory)
    # GPT2LMHeadModel saves "transformer.h.0...", GPT2Model (and the hub's gpt2) plain "h.0..."
    prefix = HF_PREFIX if any(k.startswith(HF_PREFIX) for k in tensors) else ""
    where = os.path.join(directory, HF_WEIGHTS)

    def fetch(hf_name, shape, transpose):
        key = prefix + hf_name
        if key not in tensors:
            raise InteropError(f"{where}: missing tensor {key!r}")
        array = tensors[key]
        want = shape[::-1] if transpose else shape
        if tuple(array.shape) != tuple(want):
            raise InteropError(f"{where}: tensor {key!r} has shape {tuple(array.shape)}, expected {tuple(want)} for {config}")
        return array.T if transpose else array

    flat = np.zeros(num_parameters(config), dtype=np.float32)
    views = _views(config, flat)
    V = config.vocab_size
    views["wte"][:V] = fetch(_HF_GLOBAL_NAMES["wte"], (V, config.channels), False)
    for name in ("wpe", "lnfw", "lnfb"):
        views[name][:] = fetch(_HF_GLOBAL_NAMES[name], views[name].shape, False)
    for name, (hf_name, transpose) in _HF_LAYER_NAMES.items():
        for layer in range(config.num_layers):
            views[name][layer] = fetch(f"h.{layer}.{hf_name}", views[name].shape[1:], transpose)
    lm_head = tensors.get("lm_head.weight")
    if lm_head is not None and hf_config.get("tie_word_embeddings", True) is False:
        if lm_head.shape != (V, config.channels) or not np.array_equal(lm_head, views["wte"][:V]):
            raise InteropError(f"{where}: lm_head.weight is not tied to wte (tie_word_embeddings=false); "
                               "llm.c's GPT-2 shares them")
    return config, flat


def hf_config_dict(config):
    """config.json for config, as GPT2LMHeadModel.save_pretrained writes it (dropout off)."""
    d = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.max_seq_len,
        "n_ctx": config.max_seq_len,
        "n_embd": config.channels,
        "n_layer": config.num_layers,
        "n_head": config.num_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
    }
    # GPT-2's <|endoftext|> where the vocabulary has it (HF's default, out of range otherwise)
    d["bos_token_id"] = d["eos_token_id"] = 50256 if config.vocab_size > 50256 else None
    return d


def export_hf_gpt2(directory, config, flat_params):
    """Writes config.json and model.safetensors (float32, the "transformer." names that
    GPT2LMHeadModel.save_pretrained writes, Conv1D weights (in, out)) into directory, creating
    it; wte's padded rows are dropped. Each file is written atomically."""
    from safetensors.numpy import save_file

    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise InteropError(f"{directory}: exists and is not a directory")
    flat = _check_flat(config, flat_params, directory)
    views = _views(config, np.asarray(flat, dtype=np.float32))
    tensors = {HF_PREFIX + _HF_GLOBAL_NAMES["wte"]: np.ascontiguousarray(views["wte"][:config.vocab_size])}
    for name in ("wpe", "lnfw", "lnfb"):
        tensors[HF_PREFIX + _HF_GLOBAL_NAMES[name]] = np.ascontiguousarray(views[name])
    for name, (hf_name, transpose) in _HF_LAYER_NAMES.items():
        for layer in range(config.num_layers):
            array = views[name][layer]
            tensors[f"{HF_PREFIX}h.{layer}.{hf_name}"] = np.ascontiguousarray(array.T if transpose else array)
    os.makedirs(directory, exist_ok=True)
    text = json.dumps(hf_config_dict(config), indent=2) + "\n"

    def write_config(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _atomic_write(os.path.join(directory, HF_WEIGHTS), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(os.path.join(directory, HF_CONFIG), write_config)


# ---- command line ----------------------------------------------------------------------------

def _is_llmc(path):
    return os.fspath(path).lower().endswith(".bin")


def _is_checkpoint(path):
    return os.fspath(path).lower().endswith(".h5")


def read_model(path, weights="bf16"):
    """(GPT2Config, flat float32 parameters) of any model nanollm reads: an llm.c .bin, a Hugging
    Face GPT-2 directory, or a nanollm checkpoint .h5 (weights: "bf16" parameters or "master")."""
    if _is_checkpoint(path):
        from .checkpoint import load_model

        return load_model(path, master=weights == "master")
    if weights != "bf16":
        raise InteropError(f"{path}: --weights {weights} is for nanollm checkpoints (.h5) only")
    return read_llmc_model(path) if _is_llmc(path) else import_hf_gpt2(path)


def convert(src, dst, dtype=None, weights="bf16"):
    """src -> dst: src an llm.c .bin file, an HF directory or a nanollm checkpoint .h5 (weights:
    its "bf16" parameters or fp32 "master" weights); dst a .bin file or an HF directory. dtype
    ('fp32'/'bf16') picks the .bin version written; by default a .bin source keeps its own, a
    checkpoint's bf16 parameters give bf16 (exact), anything else fp32."""
    if _is_checkpoint(dst):
        raise InteropError(f"{dst}: cannot write a nanollm checkpoint (training writes those, with -n); "
                           "OUT must be a .bin file or a Hugging Face directory")
    src_version = None
    if _is_llmc(src):
        _, src_version = read_llmc_header(src)
    elif _is_checkpoint(src) and weights == "bf16":
        src_version = VERSION_BF16
    config, flat = read_model(src, weights)
    if _is_llmc(dst):
        version = {"fp32": VERSION_FP32, "bf16": VERSION_BF16}.get(dtype, src_version or VERSION_FP32)
        write_llmc_model(dst, config, flat, version=version)
    else:
        if dtype == "bf16":
            raise InteropError(f"{dst}: Hugging Face export writes float32 only (--dtype bf16 is for .bin outputs)")
        export_hf_gpt2(dst, config, flat)
    return config


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanollm.interop",
                                     description="Convert GPT-2 models between llm.c .bin files and Hugging Face directories.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="IN -> OUT; a path ending in .bin is an llm.c model file, .h5 a nanollm "
                                          "checkpoint (IN only), anything else a Hugging Face directory "
                                          "(config.json + model.safetensors)")
    conv.add_argument("src", metavar="IN")
    conv.add_argument("dst", metavar="OUT")
    conv.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                      help="storage of a .bin OUT: fp32 (version 3) or bf16 (version 5); "
                           "default: the .bin IN's own, bf16 from a checkpoint's bf16 parameters, else fp32")
    conv.add_argument("--weights", choices=("bf16", "master"), default="bf16",
                      help="for a checkpoint IN (.h5): its bf16 parameters (default; what the GPU model computes "
                           "with) or its fp32 master weights")
    args = parser.parse_args(argv)
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        parser.exit(2, f"{parser.prog}: error: IN and OUT are the same path: {args.src}\n")
    try:
        config = convert(args.src, args.dst, args.dtype, args.weights)
    except (OSError, ValueError, KeyError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"wrote {args.dst}: {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
