"""nanollm.interop: llm.c model files and Hugging Face GPT-2 directories.

The .bin tests build files byte by byte from DESIGN.md's "Formats" (llm.c's train_gpt2.py
write_model); the HF tests load our export into transformers' GPT2LMHeadModel and compare its
logits with nanollm.reference.gpt2_forward, float32 on both sides.
"""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from nanollm import interop
from nanollm.config import GPT2Config, num_parameters, parameter_shapes
from nanollm.interop import (InteropError, export_hf_gpt2, import_hf_gpt2, read_llmc_model,
                             write_llmc_model)
from nanollm.kernels.bf16 import round_to_bf16, to_bf16_bits
from nanollm.reference import ParameterTensors, gpt2_forward

from .conftest import SESSION_SEED

TINY = GPT2Config(max_seq_len=16, vocab_size=97, padded_vocab_size=128, num_layers=2, num_heads=2, channels=32)
V = TINY.vocab_size
# float32 forward in both nanollm and torch: measured max |difference| ~1e-6 on logits of size ~2
LOGITS_ATOL = 2e-5
LOGITS_RTOL = 1e-5


def random_params(config, seed, scale=0.3):
    """Every tensor random (layernorms too, so a swapped or untransposed tensor shows), padded wte rows 0."""
    params = ParameterTensors(config)
    params.memory[:] = np.random.default_rng(seed).normal(0.0, scale, params.memory.size)
    params.wte[config.vocab_size:] = 0.0
    return params


def header_bytes(config, version, magic=20240326):
    header = np.zeros(256, dtype="<i4")
    header[:8] = (magic, version, config.max_seq_len, config.vocab_size, config.num_layers,
                  config.num_heads, config.channels, config.padded_vocab_size)
    return header.tobytes()


def hand_written_file(path, config, tensors, version):
    """An llm.c model file from the spec: header, then each tensor in llm.c's order."""
    with open(path, "wb") as f:
        f.write(header_bytes(config, version))
        for name in parameter_shapes(config):
            t = tensors[name].astype("<f4")
            f.write(t.tobytes() if version == 3 else to_bf16_bits(t).astype("<u2").tobytes())


# ---- llm.c model files -----------------------------------------------------------------------

def test_llmc_fp32_round_trip_is_exact(tmp_path):
    params = random_params(TINY, SESSION_SEED)
    path = tmp_path / "model.bin"
    write_llmc_model(path, TINY, params.memory, version=3)
    assert path.stat().st_size == 1024 + 4 * num_parameters(TINY)
    config, flat = read_llmc_model(path)
    assert config == TINY
    assert flat.dtype == np.float32
    np.testing.assert_array_equal(flat, params.memory)
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]  # no temp file left behind


def test_llmc_bf16_round_trip_equals_bf16_rounding(tmp_path):
    params = random_params(TINY, SESSION_SEED + 1)
    # values exactly halfway between two bf16 numbers: nearest even, both directions
    params.wpe[0, :4] = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F808001], dtype=np.uint32).view(np.float32)
    path = tmp_path / "model_bf16.bin"
    write_llmc_model(path, TINY, params.memory)  # version 5 is the default, as llm.c's default
    assert path.stat().st_size == 1024 + 2 * num_parameters(TINY)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:8]) == [20240326, 5, 16, 97, 2, 2, 32, 128] and not header[8:].any()
    config, flat = read_llmc_model(path)
    assert config == TINY
    np.testing.assert_array_equal(flat, round_to_bf16(params.memory))
    np.testing.assert_array_equal(flat.reshape(-1)[TINY.padded_vocab_size * 32:][:4].view(np.uint32),
                                  [0x3F800000, 0x3F820000, 0xBF800000, 0x3F810000])


@pytest.mark.parametrize("version", [3, 5])
def test_llmc_reads_a_file_written_by_hand(tmp_path, version):
    config = GPT2Config(max_seq_len=8, vocab_size=5, padded_vocab_size=8, num_layers=3, num_heads=2, channels=4)
    rng = np.random.default_rng(SESSION_SEED + version)
    tensors = {name: rng.normal(size=shape).astype(np.float32) for name, shape in parameter_shapes(config).items()}
    path = tmp_path / "hand.bin"
    hand_written_file(path, config, tensors, version)
    got_config, flat = read_llmc_model(str(path))
    assert got_config == config
    params = ParameterTensors(config)
    params.memory[:] = flat
    for name, t in tensors.items():
        np.testing.assert_array_equal(params[name], t if version == 3 else round_to_bf16(t), err_msg=name)


def test_llmc_write_is_atomic_over_an_old_file(tmp_path):
    path = tmp_path / "m.bin"
    write_llmc_model(path, TINY, random_params(TINY, 1).memory, version=3)
    new = random_params(TINY, 2)
    write_llmc_model(path, TINY, new.memory, version=3)
    np.testing.assert_array_equal(read_llmc_model(path)[1], new.memory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    # a failing write leaves the old file and no temp file
    with pytest.raises(InteropError, match="flat_params"):
        write_llmc_model(path, TINY, new.memory[:-1], version=3)
    with pytest.raises(InteropError, match="version 4"):
        write_llmc_model(path, TINY, new.memory, version=4)
    np.testing.assert_array_equal(read_llmc_model(path)[1], new.memory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]


def _good_file(tmp_path, version=3):
    path = tmp_path / "m.bin"
    write_llmc_model(path, TINY, random_params(TINY, 3).memory, version=version)
    return path


def _patch_header(path, index, value):
    data = bytearray(path.read_bytes())
    data[4 * index:4 * index + 4] = np.int32(value).astype("<i4").tobytes()
    path.write_bytes(bytes(data))


def test_llmc_bad_magic(tmp_path):
    path = _good_file(tmp_path)
    _patch_header(path, 0, 20240520)  # a token shard's magic
    with pytest.raises(InteropError, match=r"m\.bin.*bad magic 20240520"):
        read_llmc_model(path)


@pytest.mark.parametrize("version,hint", [(1, "before the padded vocabulary"), (4, "fp32 layernorms"), (7, "readable")])
def test_llmc_unknown_version(tmp_path, version, hint):
    path = _good_file(tmp_path)
    _patch_header(path, 1, version)
    with pytest.raises(InteropError, match=rf"m\.bin.*version {version}.*{hint}"):
        read_llmc_model(path)


@pytest.mark.parametrize("version", [3, 5])
def test_llmc_truncated_or_too_long(tmp_path, version):
    path = _good_file(tmp_path, version)
    data = path.read_bytes()
    path.write_bytes(data[:-2])
    with pytest.raises(InteropError, match=r"m\.bin.*truncated"):
        read_llmc_model(path)
    path.write_bytes(data[:100])
    with pytest.raises(InteropError, match=r"m\.bin.*truncated.*header"):
        read_llmc_model(path)
    path.write_bytes(data + b"\0\0\0\0")
    with pytest.raises(InteropError, match=r"m\.bin.*trailing bytes"):
        read_llmc_model(path)
    # the bf16 file read as fp32 (header says 3) is also a size mismatch, not garbage
    path.write_bytes(data)
    _patch_header(path, 1, 5 if version == 3 else 3)
    with pytest.raises(InteropError, match=r"m\.bin"):
        read_llmc_model(path)


@pytest.mark.parametrize("index,value,message", [
    (5, 3, r"C=32 is not a multiple of num_heads NH=3"),
    (7, 96, r"Vp=96 < vocab V=97"),
    (4, 0, r"num_layers=0"),
])
def test_llmc_inconsistent_header(tmp_path, index, value, message):
    path = _good_file(tmp_path)
    _patch_header(path, index, value)
    with pytest.raises(InteropError, match=rf"m\.bin: inconsistent model header.*{message}"):
        read_llmc_model(path)


def test_llmc_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        read_llmc_model(tmp_path / "nope.bin")


# ---- Hugging Face GPT-2 ----------------------------------------------------------------------

def _hf_logits(directory, tokens):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, info = transformers.GPT2LMHeadModel.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


def test_hf_export_matches_transformers_and_imports_back(tmp_path):
    pytest.importorskip("safetensors")
    params = random_params(TINY, SESSION_SEED + 2)
    params.wte[V:] = 7.0  # padded rows must be dropped on export (and come back as zeros)
    directory = tmp_path / "hf"
    export_hf_gpt2(directory, TINY, params.memory)
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    hf = json.loads((directory / "config.json").read_text())
    assert hf["model_type"] == "gpt2" and hf["vocab_size"] == V and hf["n_positions"] == hf["n_ctx"] == 16
    assert (hf["n_embd"], hf["n_layer"], hf["n_head"]) == (32, 2, 2)
    assert hf["activation_function"] == "gelu_new" and hf["tie_word_embeddings"] is True
    assert hf["resid_pdrop"] == hf["embd_pdrop"] == hf["attn_pdrop"] == 0.0

    tokens = np.random.default_rng(SESSION_SEED).integers(0, V, size=(3, 16))
    logits, _, _ = gpt2_forward(params, TINY, tokens)
    np.testing.assert_allclose(_hf_logits(directory, tokens), logits[..., :V], rtol=LOGITS_RTOL, atol=LOGITS_ATOL)

    config, flat = import_hf_gpt2(directory)
    assert config == TINY
    expected = params.memory.copy()
    expected[V * 32:TINY.padded_vocab_size * 32] = 0.0
    np.testing.assert_array_equal(flat, expected)


def test_hf_import_of_save_pretrained(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(SESSION_SEED)
    hf_config = transformers.GPT2Config(vocab_size=200, n_positions=12, n_embd=48, n_layer=3, n_head=4,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                        bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(hf_config)
    with torch.no_grad():  # every tensor random, layernorms and biases too
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(tmp_path / "saved")

    config, flat = import_hf_gpt2(tmp_path / "saved")
    assert config == GPT2Config(max_seq_len=12, vocab_size=200, padded_vocab_size=256, num_layers=3,
                                num_heads=4, channels=48)
    params = ParameterTensors(config)
    params.memory[:] = flat
    assert not params.wte[200:].any()
    np.testing.assert_array_equal(params.qkvw[1], model.transformer.h[1].attn.c_attn.weight.detach().numpy().T)

    tokens = np.random.default_rng(SESSION_SEED).integers(0, 200, size=(2, 12))
    model.eval()
    with torch.no_grad():
        hf_logits = model(torch.from_numpy(tokens)).logits.numpy()
    logits, _, _ = gpt2_forward(params, config, tokens)
    np.testing.assert_allclose(logits[..., :200], hf_logits, rtol=LOGITS_RTOL, atol=LOGITS_ATOL)


def test_hf_import_plain_names_and_bf16(tmp_path):
    """The hub's gpt2 checkpoint has GPT2Model's names (no "transformer." prefix); bf16 storage
    (which numpy cannot name) is widened exactly."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    params = random_params(TINY, SESSION_SEED + 4)
    export_hf_gpt2(tmp_path, TINY, params.memory)
    tensors = safetensors_numpy.load_file(tmp_path / "model.safetensors")
    plain = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    safetensors_numpy.save_file(plain, tmp_path / "model.safetensors", metadata={"format": "pt"})
    np.testing.assert_array_equal(import_hf_gpt2(tmp_path)[1], params.memory)

    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file
    save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in plain.items()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    np.testing.assert_array_equal(import_hf_gpt2(tmp_path)[1], round_to_bf16(params.memory))


def test_hf_missing_files_and_tensors(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    with pytest.raises(FileNotFoundError, match="absent.*not a directory"):
        import_hf_gpt2(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        import_hf_gpt2(tmp_path)
    export_hf_gpt2(tmp_path, TINY, random_params(TINY, 5).memory)
    weights = tmp_path / "model.safetensors"
    tensors = safetensors_numpy.load_file(weights)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        import_hf_gpt2(tmp_path)
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    safetensors_numpy.save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(InteropError, match=r"model\.safetensors: missing tensor 'transformer\.h\.1\.mlp\.c_fc\.bias'"):
        import_hf_gpt2(tmp_path)
    tensors["transformer.h.1.mlp.c_fc.bias"] = np.zeros(4 * 32 + 1, dtype=np.float32)
    safetensors_numpy.save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(InteropError, match=r"'transformer\.h\.1\.mlp\.c_fc\.bias' has shape \(129,\)"):
        import_hf_gpt2(tmp_path)


def test_hf_config_llmc_cannot_represent(tmp_path):
    pytest.importorskip("safetensors")
    export_hf_gpt2(tmp_path, TINY, random_params(TINY, 6).memory)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(hf, activation_function="relu", n_inner=64)))
    with pytest.raises(InteropError, match=r"config\.json: not convertible.*n_inner=64.*activation_function='relu'"):
        import_hf_gpt2(tmp_path)


# ---- command line ----------------------------------------------------------------------------

def test_convert_round_trip_bin_hf_bin(tmp_path):
    pytest.importorskip("safetensors")
    params = random_params(TINY, SESSION_SEED + 7)
    src = tmp_path / "in.bin"
    write_llmc_model(src, TINY, params.memory, version=3)
    assert interop.main(["convert", str(src), str(tmp_path / "hf")]) == 0
    assert interop.main(["convert", str(tmp_path / "hf"), str(tmp_path / "out.bin")]) == 0
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
    assert interop.main(["convert", str(src), str(tmp_path / "b.bin"), "--dtype", "bf16"]) == 0
    config, flat = read_llmc_model(tmp_path / "b.bin")
    np.testing.assert_array_equal(flat, round_to_bf16(params.memory))


def test_convert_bad_input_exits_2(tmp_path, capsys):
    for argv, message in [
        (["convert", str(tmp_path / "missing.bin"), str(tmp_path / "o.bin")], "missing.bin"),
        (["convert", str(tmp_path / "nodir"), str(tmp_path / "o.bin")], "nodir"),
        (["convert", str(tmp_path / "a.bin"), str(tmp_path / "a.bin")], "same path"),
        (["frobnicate"], "invalid choice"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            interop.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\0" * 1024)
    result = subprocess.run([sys.executable, "-m", "nanollm.interop", "convert", str(bad), str(tmp_path / "hf")],
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 2
    assert "bad.bin: bad magic 0" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "hf").exists()


# ---- nanollm checkpoints (.h5) ---------------------------------------------------------------

def _checkpoint(path, params, num_shards=1):
    from nanollm import checkpoint

    n = params.memory.size
    checkpoint.save_checkpoint(path, checkpoint.Checkpoint(
        step=7, model_config=TINY, params_bf16=to_bf16_bits(params.memory), master=params.memory.copy(),
        m=np.zeros(n, np.float32), v=np.zeros(n, np.float32), sampling_rng={}, loader_state={}), num_shards=num_shards)
    return path


@pytest.mark.parametrize("weights", ["bf16", "master"])
def test_convert_checkpoint_loss_in_transformers_matches_nanollm(tmp_path, weights):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    params = random_params(TINY, SESSION_SEED + 8)
    src = _checkpoint(tmp_path / "checkpoint_00000007.h5", params, num_shards=2)  # as two ranks would write it
    assert interop.main(["convert", str(src), str(tmp_path / "hf"), "--weights", weights]) == 0
    assert interop.main(["convert", str(src), str(tmp_path / "m.bin"), "--weights", weights]) == 0
    expected = params.memory if weights == "master" else round_to_bf16(params.memory)
    config, flat = read_llmc_model(tmp_path / "m.bin")
    assert config == TINY and np.array_equal(flat, expected)
    assert (tmp_path / "m.bin").stat().st_size == 1024 + (2 if weights == "bf16" else 4) * num_parameters(TINY)

    tokens = np.random.default_rng(SESSION_SEED).integers(0, V, size=(3, 16))
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        hf_loss = float(model(torch.from_numpy(tokens), labels=torch.from_numpy(tokens)).loss)
    nano = ParameterTensors(TINY)
    nano.memory[:] = expected  # what nanollm computes with: the CPU path's fp32, the GPU's bf16 parameters
    _, loss, _ = gpt2_forward(nano, TINY, tokens[:, :-1], tokens[:, 1:])
    assert hf_loss == pytest.approx(loss, rel=1e-5)


def test_convert_checkpoint_bad_uses_exit_2(tmp_path, capsys):
    params = random_params(TINY, 9)
    src = _checkpoint(tmp_path / "c.h5", params)
    write_llmc_model(tmp_path / "m.bin", TINY, params.memory, version=3)
    broken = tmp_path / "broken.h5"
    broken.write_bytes(src.read_bytes()[:2000])
    for argv, message in [
        (["convert", str(src), str(tmp_path / "out.h5")], "cannot write a nanollm checkpoint"),
        (["convert", str(tmp_path / "m.bin"), str(tmp_path / "o.bin"), "--weights", "master"],
         "--weights master is for nanollm checkpoints (.h5) only"),
        (["convert", str(tmp_path / "none.h5"), str(tmp_path / "o.bin")], "none.h5: no such checkpoint file"),
        (["convert", str(broken), str(tmp_path / "o.bin")], "broken.h5"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            interop.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, message
    assert not (tmp_path / "o.bin").exists() and not (tmp_path / "out.h5").exists()


def test_checkpoint_command_help_exits_0():
    result = subprocess.run([sys.executable, "-m", "nanollm.checkpoint", "--help"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0 and "info" in result.stdout and "nanollm.interop convert" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "nanollm.checkpoint", "inspect", "x"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
