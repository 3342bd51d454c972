"""GPT-2 model configuration: sizes, the descriptor table, parameter shapes and FLOPs.

After llm.c's train_gpt2.cu (GPT2Config, gpt2_set_hyperparameters, fill_in_parameter_sizes,
gpt2_estimate_mfu). Parameters live in one flat buffer in llm.c's order, so the same order is the
layout of llm.c's model files (gpt2_124M.bin etc.) and of every flat parameter, gradient and
optimizer buffer in nanollm.
"""

import math
import re
from dataclasses import dataclass

# llm.c's GPT-2 descriptors dN: depth -> (channels, heads)
DEPTH_TABLE = {
    6: (384, 6),     # (unofficial) gpt2-tiny, 30M
    12: (768, 12),   # gpt2, 124M
    24: (1024, 16),  # gpt2-medium, 350M
    36: (1280, 20),  # gpt2-large, 774M
    48: (1600, 25),  # gpt2-xl, 1558M
    60: (1920, 30),  # (unofficial) 2.7B
    72: (2880, 30),  # (unofficial) 7.3B
    84: (3456, 36),  # (unofficial) 12.2B
}
HEAD_SIZE = 64  # width rule for depths outside the table: C = 64 * N, NH = N

# Tensors that get weight decay: the 2-D ones (matmul weights and both embeddings), as llm.c's
# gpt2_update and nanoGPT's configure_optimizers; biases and layernorm parameters are not decayed.
WEIGHT_DECAY_PARAMETERS = ("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw")


@dataclass(frozen=True)
class GPT2Config:
    max_seq_len: int = 1024         # maxT
    vocab_size: int = 50257         # V
    padded_vocab_size: int = 50304  # Vp: V rounded up to a multiple of 128 for the kernels
    num_layers: int = 12            # L
    num_heads: int = 12             # NH
    channels: int = 768             # C

    def __post_init__(self):
        for name in ("max_seq_len", "vocab_size", "padded_vocab_size", "num_layers", "num_heads", "channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPT2Config.{name} must be a positive int, got {value!r}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size {self.padded_vocab_size} < vocab_size {self.vocab_size}")
        if self.channels % self.num_heads != 0:
            raise ValueError(f"channels {self.channels} is not a multiple of num_heads {self.num_heads}")

    @property
    def head_size(self):
        return self.channels // self.num_heads


def from_descriptor(descriptor):
    """GPT-2 config from llm.c's descriptor "dN" (or "gpt2:dN"): N layers, max T 1024.

    d6, d12, d24, d36, d48, d60, d72, d84 take llm.c's widths (DEPTH_TABLE); any other depth N gets
    C = 64*N channels and NH = N heads (head size 64, as d6 and d12)."""
    if not isinstance(descriptor, str):
        raise TypeError(f"model descriptor must be a str like 'd12', got {type(descriptor).__name__}")
    match = re.fullmatch(r"(?:gpt2:)?d([0-9]+)", descriptor)
    if match is None:
        raise ValueError(f"unsupported model descriptor {descriptor!r}: expected 'dN' or 'gpt2:dN' with N >= 1, e.g. 'd12'")
    depth = int(match.group(1))
    if depth < 1:
        raise ValueError(f"unsupported model descriptor {descriptor!r}: depth must be >= 1")
    channels, num_heads = DEPTH_TABLE.get(depth, (HEAD_SIZE * depth, depth))
    return GPT2Config(num_layers=depth, num_heads=num_heads, channels=channels)


def parameter_shapes(config):
    """Name -> shape of every parameter tensor, in llm.c's order (a dict keeps the order).
    Per-layer tensors are stacked over the L layers; weights are (out, in) as PyTorch's Linear."""
    Vp, C, maxT, L = config.padded_vocab_size, config.channels, config.max_seq_len, config.num_layers
    return {
        "wte": (Vp, C),
        "wpe": (maxT, C),
        "ln1w": (L, C),
        "ln1b": (L, C),
        "qkvw": (L, 3 * C, C),
        "qkvb": (L, 3 * C),
        "attprojw": (L, C, C),
        "attprojb": (L, C),
        "ln2w": (L, C),
        "ln2b": (L, C),
        "fcw": (L, 4 * C, C),
        "fcb": (L, 4 * C),
        "fcprojw": (L, C, 4 * C),
        "fcprojb": (L, C),
        "lnfw": (C,),
        "lnfb": (C,),
    }


def num_parameters(config):
    """Every element of every tensor, the padded vocabulary rows of wte included (as llm.c)."""
    return sum(math.prod(shape) for shape in parameter_shapes(config).values())


def flops_per_token(config, T):
    """Training FLOPs per token at sequence length T, llm.c's gpt2_estimate_mfu: 6N for the
    weight matmuls forward and backward, N = num_parameters (padded wte, wpe, biases and layernorm
    included, a slight over-count llm.c accepts), plus 6*L*C*T for the attention matmuls."""
    return 6 * num_parameters(config) + 6 * config.num_layers * config.channels * T
