"""llm.c's command line: flags, defaults, and clear errors for bad values."""

import pytest

from nanollm.train_config import TrainConfig, UsageError, main_parse, parse_args, usage


def test_llmc_command_line_parses():
    config = parse_args("-i data/a_*.bin -j data/b_*.bin -e d12 -b 64 -t 1024 -d 65536 -x 50 -k wsd "
                        "-l 6e-4 -u 10 -q 0.1 -c 0.1 -v 25 -m 5 -s 0 -g 32 -ge 2 -r 0 --seed 7 --cuda-graphs 0 -z 1 "
                        "--comm mpi".split())
    assert (config.input_bin, config.input_val_bin, config.model) == ("data/a_*.bin", "data/b_*.bin", "d12")
    assert (config.batch_size, config.seq_len, config.total_batch_size, config.max_steps) == (64, 1024, 65536, 50)
    assert (config.lr_scheduler, config.learning_rate, config.warmup_iters, config.final_lr_frac) == ("wsd", 6e-4, 10, 0.1)
    assert (config.weight_decay, config.val_loss_every, config.val_max_steps, config.sample_every) == (0.1, 25, 5, 0)
    assert (config.gen_tokens, config.gelu_fusion, config.recompute, config.seed) == (32, 2, 0, 7)
    assert (config.cuda_graphs, config.zero_stage, config.comm) == (0, 1, "mpi")


def test_defaults_are_llmc_defaults():
    config = parse_args([])
    assert config == TrainConfig()
    assert (config.batch_size, config.seq_len, config.learning_rate, config.lr_scheduler) == (4, 1024, 3e-4, "cosine")
    assert (config.val_loss_every, config.val_max_steps, config.sample_every, config.gen_tokens) == (20, 20, 20, 64)


@pytest.mark.parametrize("argv, message", [
    (["-b", "x"], "-b expects an integer"),
    (["-l", "fast"], "-l expects a number"),
    (["-b", "0"], "-b must be >= 1"),
    (["-t", "2048"], "-t must be in 1..1024"),
    (["-k", "step"], "-k must be one of"),
    (["-q", "1.5"], "-q must be in"),
    (["-zz", "1"], "unknown option '-zz'"),
    (["-b"], "needs a value"),
    (["-r", "2"], "-r must be 0 or 1"),
    (["-n", "100"], "-n and -y need an output directory -o"),
    (["-y", "2", "-o", "out"], "-y must be 0 or 1"),
    (["-z", "2"], "-z 2: ZeRO stages 2 and 3 (sharded gradients, sharded parameters) are not supported"),
    (["-z", "3"], "-z 3: ZeRO stages 2 and 3"),
    (["-z", "-1"], "-z must be 0 or 1"),
    (["--comm", "gloo"], "--comm must be auto, nccl or mpi"),
    (["--cuda-graphs", "2"], "--cuda-graphs must be 0 or 1"),
    (["--attention", "flash"], "--attention must be auto, cudnn or numba"),
])
def test_bad_values_are_clear_errors(argv, message):
    with pytest.raises(UsageError) as error:
        parse_args(argv)
    assert message in str(error.value)


def test_command_line_errors_exit_2_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_parse(["-b", "-3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "-b must be >= 1" in err and "Usage:" in err


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("-i", "-j", "-e", "-o", "-n", "-nk", "-nm", "-y", "-b", "-t", "-d", "-x", "-k", "-l", "-u", "-q",
                 "-c", "-v", "-m", "-s", "-g", "-h", "-a", "-ge", "-z", "-r"):
        assert f"  {flag} " in text, flag
    assert usage() in text
