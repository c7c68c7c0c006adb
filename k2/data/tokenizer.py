"""Tokenizers: a built-in byte tokenizer and Kimi-K2's tiktoken BPE, behind one small protocol.

Source: the released Kimi-K2 tokenizer (``tiktoken.model``: 163,584 base ranks + 256 special ids 163584–163839, the
pre-tokeniser regex of Moonshot's ``tokenization_kimi.py``, input split into ≤ 400k-char pieces and runs of
≤ 25k whitespace / non-whitespace characters so tiktoken never sees a pathological run).

``ByteTokenizer`` is the built-in tokenizer of the embedded default (``presets.tiny``, vocab 512): ids 0–255 are
the UTF-8 bytes and ids 256–511 are Kimi-K2's 256 special slots in the same order (id = kimi_id − 163584 + 256),
so every special token, reserved ones included, has a single id and the chat format works unchanged.

Special-token strings are recognised in ``encode`` only with ``allow_special=True``; otherwise they are encoded
as ordinary text, which keeps user-supplied text from injecting control tokens.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import tiktoken

from k2.errors import DataError

# Kimi-K2 layout of the special ids (the released tokenizer_config.json).
KIMI_NUM_BASE_TOKENS = 163_584
NUM_SPECIAL_SLOTS = 256
KIMI_SPECIAL_TOKENS: dict[str, int] = {
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
    "<think>": 163606,  # K2-Thinking addition [2nd]; a reserved slot in K2-Instruct
    "</think>": 163607,
    "[UNK]": 163838,
    "[PAD]": 163839,
}

# Moonshot's pre-tokeniser (tokenization_kimi.py): Han runs, case-aware letter runs with English contractions,
# numbers in groups of ≤ 3 digits, punctuation runs, newlines, whitespace.
KIMI_PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

MAX_ENCODE_CHARS = 400_000  # tiktoken is safe below this many characters per call
MAX_RUN_CHARS = 25_000  # ... and below this many consecutive (non-)whitespace characters

CONFIG_NAME = "tokenizer_config.json"
TIKTOKEN_NAME = "tiktoken.model"


@runtime_checkable
class Tokenizer(Protocol):
    """What the trainer, the chat format and the inference engine need from a tokenizer."""

    special_tokens: dict[str, int]

    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    def encode(self, text: str, *, allow_special: bool = False) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...
    def save(self, directory: str | os.PathLike[str]) -> None: ...


def kimi_special_tokens(start: int = KIMI_NUM_BASE_TOKENS) -> dict[str, int]:
    """All 256 special slots of Kimi-K2 mapped to ids ``start … start+255``; unnamed slots are reserved tokens
    named ``<|reserved_token_{kimi_id}|>`` as in Moonshot's tokenizer."""
    named = {kimi_id: name for name, kimi_id in KIMI_SPECIAL_TOKENS.items()}
    out: dict[str, int] = {}
    for slot in range(NUM_SPECIAL_SLOTS):
        kimi_id = KIMI_NUM_BASE_TOKENS + slot
        out[named.get(kimi_id, f"<|reserved_token_{kimi_id}|>")] = start + slot
    return out


def _special_regex(names: Sequence[str]) -> re.Pattern[str]:
    # Longest first so that no token matches as a prefix of a longer one.
    return re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)))


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_ids(ids: Sequence[int], vocab_size: int, who: str) -> None:
    for i in ids:
        if not 0 <= int(i) < vocab_size:
            raise ValueError(f"{who}.decode: token id {int(i)} is outside the vocabulary [0, {vocab_size})")


class ByteTokenizer:
    """UTF-8 bytes (ids 0–255) plus Kimi-K2's 256 special slots (ids 256–511); vocab 512, no training needed."""

    def __init__(self) -> None:
        self.special_tokens: dict[str, int] = kimi_special_tokens(start=256)
        self._id_to_special = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        self._special_re = _special_regex(list(self.special_tokens))

    @property
    def vocab_size(self) -> int:
        return 256 + NUM_SPECIAL_SLOTS

    @property
    def bos_id(self) -> int:
        return self.special_tokens["[BOS]"]

    @property
    def eos_id(self) -> int:
        return self.special_tokens["[EOS]"]

    @property
    def pad_id(self) -> int:
        return self.special_tokens["[PAD]"]

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Text → ids; special-token strings become single ids only with ``allow_special=True``."""
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode: text must be str, got {type(text).__name__}")
        if not allow_special:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            ids.extend(text[pos : m.start()].encode("utf-8"))
            ids.append(self.special_tokens[m.group()])
            pos = m.end()
        ids.extend(text[pos:].encode("utf-8"))
        return ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Ids → raw bytes (special tokens as their UTF-8 strings); for streaming, where a character may be cut."""
        _check_ids(ids, self.vocab_size, "ByteTokenizer")
        return b"".join(bytes((i,)) if i < 256 else self._id_to_special[i] for i in map(int, ids))

    def decode(self, ids: Sequence[int]) -> str:
        """Ids → text; special tokens appear as their strings, invalid UTF-8 as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``tokenizer_config.json`` naming this tokenizer, so ``load_tokenizer(directory)`` restores it."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _write_atomic(d / CONFIG_NAME, json.dumps(_config_dict(self, "byte"), indent=2).encode())

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=512)"


def read_tiktoken_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """Parse a ``tiktoken.model`` file: one ``base64(token) rank`` pair per line; raises ``DataError``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"tokenizer file does not exist: {p}")
    ranks: dict[bytes, int] = {}
    with open(p, "rb") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                if len(parts) != 2:
                    raise ValueError("expected 'base64token rank'")
                ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
            except (ValueError, binascii.Error) as e:
                raise DataError(f"{p}:{lineno}: not a tiktoken BPE line ({e})") from None
    if not ranks:
        raise DataError(f"tokenizer file is empty: {p}")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError(f"{p}: ranks must be the distinct integers 0..{len(ranks) - 1}")
    return ranks


def _split_runs(s: str, max_run: int) -> Iterator[str]:
    """Cut ``s`` so no piece holds more than ``max_run`` consecutive whitespace or non-whitespace characters."""
    start, run, in_space = 0, 0, s[:1].isspace()
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if is_space != in_space:
            run, in_space = 1, is_space
        else:
            run += 1
            if run > max_run:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


class TiktokenTokenizer:
    """Kimi-K2's tiktoken BPE: base ranks from a ``tiktoken.model`` file, special tokens in the 256 ids after them."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        *,
        special_tokens: dict[str, int] | None = None,
        pat_str: str = KIMI_PAT_STR,
        bos_token: str = "[BOS]",
        eos_token: str = "[EOS]",
        pad_token: str = "[PAD]",
        name: str = "kimi",
    ) -> None:
        n_base = len(mergeable_ranks)
        self.special_tokens = dict(special_tokens) if special_tokens is not None else kimi_special_tokens(n_base)
        for role, tok in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
            if tok not in self.special_tokens:
                raise DataError(f"TiktokenTokenizer: {role} token {tok!r} is not a special token")
        self._names = (bos_token, eos_token, pad_token)
        self.mergeable_ranks = mergeable_ranks
        self.pat_str = pat_str
        self._enc = tiktoken.Encoding(
            name=name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )
        self._vocab_size = max(n_base, max(self.special_tokens.values(), default=-1) + 1)
        self._id_to_special = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kwargs: Any) -> TiktokenTokenizer:
        """Load a ``tiktoken.model`` file; special tokens default to Kimi-K2's, right after the base ranks
        (ids 163584–163839 for the real Kimi-K2 file)."""
        return cls(read_tiktoken_ranks(path), name=Path(path).name, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self.special_tokens[self._names[0]]

    @property
    def eos_id(self) -> int:
        return self.special_tokens[self._names[1]]

    @property
    def pad_id(self) -> int:
        return self.special_tokens[self._names[2]]

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Text → ids, cut into ≤ 400k-char pieces and ≤ 25k-char (non-)whitespace runs first (as Kimi-K2 does)."""
        if not isinstance(text, str):
            raise TypeError(f"TiktokenTokenizer.encode: text must be str, got {type(text).__name__}")
        ids: list[int] = []
        for i in range(0, max(len(text), 1), MAX_ENCODE_CHARS):
            for piece in _split_runs(text[i : i + MAX_ENCODE_CHARS], MAX_RUN_CHARS):
                if allow_special:
                    ids.extend(self._enc.encode(piece, allowed_special="all"))
                else:
                    ids.extend(self._enc.encode_ordinary(piece))
        return ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Ids → raw bytes (special tokens as their strings); for streaming, where a character may be cut."""
        ids = [int(i) for i in ids]
        _check_ids(ids, self._vocab_size, "TiktokenTokenizer")
        unknown = [i for i in ids if i >= len(self.mergeable_ranks) and i not in self._id_to_special]
        if unknown:
            raise ValueError(f"TiktokenTokenizer.decode: token id {unknown[0]} has no token")
        return self._enc.decode_bytes(ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids → text; special tokens appear as their strings, invalid UTF-8 as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``tiktoken.model`` and ``tokenizer_config.json`` (the Kimi-K2 checkpoint layout)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        lines = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        body = b"".join(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n" for tok, rank in lines)
        _write_atomic(d / TIKTOKEN_NAME, body)
        config = _config_dict(self, "tiktoken")
        config["k2_pat_str"] = self.pat_str
        _write_atomic(d / CONFIG_NAME, json.dumps(config, indent=2).encode())

    def __repr__(self) -> str:
        return f"TiktokenTokenizer(vocab_size={self.vocab_size}, specials={len(self.special_tokens)})"


def _config_dict(tok: ByteTokenizer | TiktokenTokenizer, kind: str) -> dict[str, Any]:
    id_to_name = {i: s for s, i in tok.special_tokens.items()}
    return {
        "k2_tokenizer": kind,
        "bos_token": id_to_name[tok.bos_id],
        "eos_token": id_to_name[tok.eos_id],
        "pad_token": id_to_name[tok.pad_id],
        "added_tokens_decoder": {
            str(i): {"content": s, "special": True} for s, i in sorted(tok.special_tokens.items(), key=lambda x: x[1])
        },
    }


def _token_name(value: Any) -> str | None:
    # HF configs write a token either as a string or as {"content": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str | os.PathLike[str]) -> ByteTokenizer | TiktokenTokenizer:
    """Load what ``save`` wrote, a Kimi-K2 checkpoint directory (``tiktoken.model`` + ``tokenizer_config.json``)
    or a bare ``tiktoken.model`` file. The name ``"byte"`` gives the built-in ``ByteTokenizer``."""
    if str(path) == "byte":
        return ByteTokenizer()
    p = Path(path)
    if p.is_file():
        return TiktokenTokenizer.from_file(p)
    if not p.is_dir():
        raise DataError(f"tokenizer path does not exist: {p}")
    config: dict[str, Any] = {}
    if (p / CONFIG_NAME).is_file():
        try:
            config = json.loads((p / CONFIG_NAME).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{p / CONFIG_NAME}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if config.get("k2_tokenizer") == "byte":
        return ByteTokenizer()
    if not (p / TIKTOKEN_NAME).is_file():
        raise DataError(f"no tokenizer in {p}: expected {TIKTOKEN_NAME} or a {CONFIG_NAME} written by k2")
    ranks = read_tiktoken_ranks(p / TIKTOKEN_NAME)
    specials = kimi_special_tokens(len(ranks))
    decoder = config.get("added_tokens_decoder") or {}
    if decoder:
        by_id = {i: s for s, i in specials.items()}
        for key, value in decoder.items():
            name = _token_name(value)
            if name is not None and int(key) >= len(ranks):
                by_id[int(key)] = name
        specials = {s: i for i, s in by_id.items()}
    kwargs: dict[str, Any] = {}
    for role in ("bos", "eos", "pad"):
        name = _token_name(config.get(f"{role}_token"))
        if name is not None and name in specials:
            kwargs[f"{role}_token"] = name
    return TiktokenTokenizer(
        ranks,
        special_tokens=specials,
        pat_str=config.get("k2_pat_str", KIMI_PAT_STR),
        name=p.name,
        **kwargs,
    )
