"""Tokenizers: the built-in byte tokenizer and Kimi-K2's tiktoken format, checked against the released Kimi-K2
tokenizer (ids spelled out here independently) and against tiktoken's pure-Python educational BPE as the encoding
oracle."""

from __future__ import annotations

import base64
import itertools
import json
import random
from pathlib import Path

import pytest
import tiktoken._educational as edu

from k2.data.tokenizer import (
    KIMI_PAT_STR,
    MAX_RUN_CHARS,
    ByteTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    _split_runs,
    load_tokenizer,
)
from k2.errors import DataError

# The released layout, written out again so a typo in k2.data.tokenizer cannot hide.
SPEC_IDS = {
    "[BOS]": 163584,
    "[EOS]": 163585,
    "<|im_end|>": 163586,
    "<|im_user|>": 163587,
    "<|im_assistant|>": 163588,
    "<|start_header_id|>": 163590,
    "<|end_header_id|>": 163591,
    "[EOT]": 163593,
    "<|im_system|>": 163594,
    "<|tool_calls_section_begin|>": 163595,
    "<|tool_calls_section_end|>": 163596,
    "<|tool_call_begin|>": 163597,
    "<|tool_call_argument_begin|>": 163598,
    "<|tool_call_end|>": 163599,
    "<|im_middle|>": 163601,
    "[UNK]": 163838,
    "[PAD]": 163839,
}

TRAIN_TEXT = (
    "Hello world! The quick brown fox jumps over the lazy dog. It's 12345 o'clock; we're HERE and they'll "
    "go.\n\n  Indented line\twith tab. 你好世界，今天天气很好。 Ünïcödé naïve café 3.14159 "
) * 30
SAMPLES = [
    "",
    "Hello WORLD, you're 1234567 today!",
    "你好世界 mixed with English and 数字 42",
    "  leading spaces\n\n\ttabs and\r\nCRLF  ",
    "emoji 🙂🚀 and combining e\u0301",
    "The quick brown fox's den isn't THERE'LL",
]


def _random_text(rng: random.Random, n: int) -> str:
    alphabet = "abcXYZ 019\n\t'.,!你好é🙂<|>_" + "".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(20))
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.fixture(scope="module")
def small_ranks() -> dict[bytes, int]:
    """256 bytes + 80 merges learned from TRAIN_TEXT with the Kimi-K2 pre-tokeniser."""
    return edu.bpe_train(TRAIN_TEXT, 256 + 80, "(?V1)" + KIMI_PAT_STR, visualise=None)


def _write_ranks(path: Path, ranks: dict[bytes, int]) -> Path:
    lines = [base64.b64encode(tok).decode() + f" {rank}" for tok, rank in sorted(ranks.items(), key=lambda x: x[1])]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def kimi_sized_file(small_ranks: dict[bytes, int], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ranks file with exactly Kimi-K2's 163,584 base tokens: the learned BPE, then filler tokens made only of
    bytes 0x80–0xFF in threes. No pair of filler pieces is a token, so fillers are never produced by encoding and
    the encoding equals the small BPE's."""
    ranks = dict(small_ranks)
    high = range(0x80, 0x100)
    for a, b, c in itertools.product(high, high, high):
        if len(ranks) == 163_584:
            break
        ranks[bytes((a, b, c))] = len(ranks)
    return _write_ranks(tmp_path_factory.mktemp("kimi") / "tiktoken.model", ranks)


def test_byte_tokenizer_layout() -> None:
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 512
    assert len(tok.special_tokens) == 256
    assert sorted(tok.special_tokens.values()) == list(range(256, 512))
    for name, kimi_id in SPEC_IDS.items():
        assert tok.special_tokens[name] == kimi_id - 163584 + 256, name
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 511)


def test_byte_tokenizer_roundtrip_and_specials() -> None:
    tok = ByteTokenizer()
    rng = random.Random(0)
    for _ in range(200):
        s = _random_text(rng, rng.randint(0, 60))
        ids = tok.encode(s)
        assert ids == list(s.encode("utf-8"))
        assert tok.decode(ids) == s
    s = "a<|im_end|>b[EOS]<|reserved_token_163589|>"
    assert tok.encode(s) == list(s.encode())  # not recognised without allow_special
    ids = tok.encode(s, allow_special=True)
    assert ids == [ord("a"), 258, ord("b"), 257, 256 + 5]
    assert tok.decode(ids) == s
    assert tok.decode_bytes([0xE4, 0xBD]) == b"\xe4\xbd"  # a cut character stays bytes
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([512])


def test_tiktoken_encoding_matches_educational_bpe(small_ranks: dict[bytes, int], tmp_path: Path) -> None:
    tok = TiktokenTokenizer.from_file(_write_ranks(tmp_path / "tiktoken.model", small_ranks))
    oracle = edu.SimpleBytePairEncoding(pat_str="(?V1)" + KIMI_PAT_STR, mergeable_ranks=small_ranks)
    rng = random.Random(1)
    texts = SAMPLES + [_random_text(rng, rng.randint(1, 80)) for _ in range(100)]
    for s in texts:
        ids = tok.encode(s)
        assert ids == oracle.encode(s, visualise=None), s
        assert tok.decode(ids) == s
    # Merges were learned, so common words are single tokens.
    assert len(tok.encode(" the")) == 1
    # Without a Kimi-sized file the special slots follow the base ranks.
    assert tok.special_tokens["[BOS]"] == len(small_ranks)
    assert tok.vocab_size == len(small_ranks) + 256


def test_tiktoken_kimi_special_ids(kimi_sized_file: Path, small_ranks: dict[bytes, int]) -> None:
    tok = TiktokenTokenizer.from_file(kimi_sized_file)
    assert tok.vocab_size == 163_840
    for name, kimi_id in SPEC_IDS.items():
        assert tok.special_tokens[name] == kimi_id, name
    assert sorted(tok.special_tokens.values()) == list(range(163_584, 163_840))
    assert tok.special_tokens["<|reserved_token_163589|>"] == 163589
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (163584, 163585, 163839)

    text = "<|im_user|>user<|im_middle|>Hi there<|im_end|>"
    ids = tok.encode(text, allow_special=True)
    assert ids[0] == 163587 and ids[-1] == 163586 and 163601 in ids
    plain = tok.encode(text)
    assert all(i < 163_584 for i in plain)
    assert tok.decode(ids) == tok.decode(plain) == text
    oracle = edu.SimpleBytePairEncoding(pat_str="(?V1)" + KIMI_PAT_STR, mergeable_ranks=small_ranks)
    assert tok.encode(SAMPLES[1]) == oracle.encode(SAMPLES[1], visualise=None)


def test_long_input_splitting(small_ranks: dict[bytes, int]) -> None:
    s = "x" * (2 * MAX_RUN_CHARS + 7) + " " * (MAX_RUN_CHARS + 3) + "tail"
    pieces = list(_split_runs(s, MAX_RUN_CHARS))
    assert "".join(pieces) == s
    for p in pieces:
        longest = max(len(list(g)) for _, g in itertools.groupby(p, key=str.isspace))
        assert longest <= MAX_RUN_CHARS
    tok = TiktokenTokenizer(small_ranks)
    assert tok.decode(tok.encode(s)) == s


def test_save_and_load_roundtrip(small_ranks: dict[bytes, int], tmp_path: Path) -> None:
    tok = TiktokenTokenizer(small_ranks)
    tok.save(tmp_path / "tk")
    assert sorted(p.name for p in (tmp_path / "tk").iterdir()) == ["tiktoken.model", "tokenizer_config.json"]
    back = load_tokenizer(tmp_path / "tk")
    assert isinstance(back, TiktokenTokenizer)
    assert back.special_tokens == tok.special_tokens
    assert back.mergeable_ranks == small_ranks
    for s in SAMPLES:
        assert back.encode(s, allow_special=True) == tok.encode(s, allow_special=True)
    assert isinstance(load_tokenizer(tmp_path / "tk" / "tiktoken.model"), TiktokenTokenizer)

    ByteTokenizer().save(tmp_path / "byte")
    assert isinstance(load_tokenizer(tmp_path / "byte"), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_load_kimi_checkpoint_dir(small_ranks: dict[bytes, int], tmp_path: Path) -> None:
    """A checkpoint directory as Moonshot ships it: names and roles come from ``tokenizer_config.json``."""
    n = len(small_ranks)
    _write_ranks(tmp_path / "tiktoken.model", small_ranks)
    config = {
        "added_tokens_decoder": {str(n + 2): {"content": "<|im_end|>"}, str(n + 5): {"content": "<|custom|>"}},
        "bos_token": {"content": "[BOS]"},
        "eos_token": "<|im_end|>",
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert tok.special_tokens["<|custom|>"] == n + 5
    assert "<|reserved_token_163589|>" not in tok.special_tokens
    assert tok.eos_id == n + 2
    assert tok.encode("<|custom|>", allow_special=True) == [n + 5]


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(DataError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.model"
    bad.write_text("YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(DataError, match=r"bad.model:2"):
        TiktokenTokenizer.from_file(bad)
    (tmp_path / "empty.model").write_text("")
    with pytest.raises(DataError, match="empty"):
        TiktokenTokenizer.from_file(tmp_path / "empty.model")
    with pytest.raises(TypeError, match="encode"):
        ByteTokenizer().encode(b"bytes")  # type: ignore[arg-type]
