"""Constrained decoding: JSON-schema and Kimi-K2 tool-call grammars, compiled and matched with llguidance.

A :class:`Grammar` is an llguidance grammar (its serialized text): built from a JSON schema (:func:`json_schema`),
for any JSON object (:func:`json_object`), or for the Kimi-K2 tool-call section (:func:`tool_calls`, the format of
``k2.data.chat``)::

    <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{args}
    <|tool_call_end|>...<|tool_calls_section_end|>

NAME is one of the declared tools, ``{args}`` matches that tool's ``parameters`` schema, and IDX counts the dialog's
calls from ``first_index`` (the chat format's call ids). A :class:`GrammarCompiler` turns grammars into
per-sequence :class:`Matcher` s for one tokenizer (compiled once per grammar text, then copied); a matcher gives the
allowed-token mask for the next token, advances on the sampled token, and is ``done`` once the grammar can take no
further token, when the sequence must stop.

JSON is generated in one layout: no free whitespace, ``", "`` between items and ``": "`` after keys (the layout of
``json.dumps``, which ``k2.data.chat`` uses for tool arguments in training data). Free whitespace would let a model
pad its output with blanks until ``max_tokens``; one layout also keeps the token statistics of training and serving
the same. Schemas are compiled strictly: keywords llguidance does not implement (``not``, ``uniqueItems``, unknown
``format`` s) are errors, never silently dropped, so every output validates against the schema it was asked for.

Why llguidance: it has no Python dependencies and ships one abi3 wheel per platform; it is the grammar engine behind
the guided decoding of vLLM, SGLang and llama.cpp; it compiles JSON schemas and Lark grammars (with special tokens
and inline ``%json`` schemas, which the tool-call grammar needs) and computes a token mask in tens of microseconds,
by walking a token trie with a derivative-based lexer and an Earley parser. xgrammar, the other common choice, would
pull triton, transformers and apache-tvm-ffi into every k2 install.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
import llguidance
import torch

from k2.data import chat
from k2.data.tokenizer import Tokenizer
from k2.errors import DataError

# llguidance's JSON compile options: one layout, as ``json.dumps`` writes it; unimplemented keywords are errors.
JSON_LAYOUT: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": False,
}
# Most calls in one tool-call section (each position has its own IDX in the grammar).
MAX_CALLS = 16
_GRAMMAR_CACHE_SIZE = 128


class GrammarError(DataError):
    """A schema or grammar that cannot be compiled: not a JSON Schema, or one using unimplemented features."""


@dataclass(frozen=True)
class Grammar:
    """An llguidance grammar: ``text`` is its serialized form (a JSON document holding Lark text or a schema)."""

    text: str


def _with_layout(schema: Mapping[str, Any] | bool) -> dict[str, Any]:
    """``schema`` with :data:`JSON_LAYOUT` as its ``x-guidance`` options (how ``%json`` takes compile options)."""
    return {**({} if schema is True else schema), "x-guidance": JSON_LAYOUT}


def check_schema(schema: Any, where: str) -> None:
    """Raise :class:`GrammarError` naming ``where`` unless ``schema`` is a JSON Schema that llguidance compiles."""
    if not isinstance(schema, (Mapping, bool)):
        raise GrammarError(f"{where} must be a JSON Schema object, got {type(schema).__name__}")
    if schema is False:
        raise GrammarError(f"{where} is the schema false, which no value matches")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        path = "".join(f"[{json.dumps(p)}]" for p in e.absolute_path)
        raise GrammarError(f"{where}{path} is not a valid JSON Schema: {e.message}") from None
    grammar = llguidance.LLMatcher.grammar_from_json_schema(_with_layout(schema))
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(f"{where} cannot be enforced: {error.strip().splitlines()[0]}")


def json_schema(schema: Mapping[str, Any] | bool, where: str = "schema") -> Grammar:
    """Exactly one JSON value that validates against ``schema`` (checked first: :class:`GrammarError`)."""
    check_schema(schema, where)
    return Grammar(llguidance.LLMatcher.grammar_from_json_schema(_with_layout(schema)))


def json_object() -> Grammar:
    """Any JSON object."""
    return json_schema({"type": "object"})


def _lark_string(s: str) -> str:
    return json.dumps(s)  # Lark string literals take JSON's escapes


def _content_terminal() -> str:
    """Free text that holds neither section nor call marker as a string (so ``chat.parse_completion`` finds no call
    in it); special tokens never match a terminal."""
    markers = "|".join(re.escape(m) for m in (chat.SECTION_BEGIN, chat.CALL_BEGIN))
    return f"TEXT: /(?s:.+)/ & ~/(?s:.*)({markers})(?s:.*)/"


def tool_calls(
    tools: Sequence[Mapping[str, Any]],
    *,
    choice: str,
    first_index: int = 0,
    parallel: bool = True,
    content_schema: Mapping[str, Any] | bool | None = None,
) -> Grammar:
    """A Kimi-K2 assistant turn with tool calls; ``tools`` are ``{"name", "parameters"}`` (``parameters`` None: any
    object). ``choice``: ``"auto"`` (content, a tool-call section, or content then a section), ``"required"`` (only
    a section of one or more calls), or a tool's name (only a section with one call to it). ``parallel=False``: at
    most one call. ``content_schema``: content is one JSON value of that schema (and then content and section
    exclude each other) instead of free text."""
    names = [t["name"] for t in tools]
    if choice not in ("auto", "required") and choice not in names:
        raise GrammarError(f"tool_calls: choice {choice!r} is neither 'auto', 'required' nor a tool name")
    callable_ = [i for i, n in enumerate(names) if choice in ("auto", "required") or n == choice]
    num_calls = 1 if (choice not in ("auto", "required") or not parallel) else MAX_CALLS
    rules = []
    for i in callable_:  # arguments are a JSON object whatever the schema says (the chat format's rule)
        params = {"type": "object", **(tools[i].get("parameters") or {})}
        rules.append(f"args_{i}: %json {json.dumps(_with_layout(params))}")
    for k in range(num_calls):
        idx = first_index + k
        alts = " | ".join(f"{_lark_string(f'functions.{names[i]}:{idx}')} {chat.ARG_BEGIN} args_{i}" for i in callable_)
        rules.append(f"call_{k}: {chat.CALL_BEGIN} ({alts}) {chat.CALL_END}")
        rules.append(f"calls_{k}: call_{k}" + (f" calls_{k + 1}?" if k + 1 < num_calls else ""))
    rules.append(f"section: {chat.SECTION_BEGIN} calls_0 {chat.SECTION_END}")
    if choice != "auto":
        start = "start: section"
    elif content_schema is not None:
        start = "start: content | section"
        rules.append(f"content: %json {json.dumps(_with_layout(content_schema))}")
    else:
        start = "start: TEXT? section?"
        rules.append(_content_terminal())
    grammar = llguidance.LLMatcher.grammar_from_lark("\n".join([start, *rules]))
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(f"the tool-call grammar cannot be compiled: {error.strip().splitlines()[0]}")
    return Grammar(grammar)


# ---- matching ------------------------------------------------------------------------------------------------------


def llg_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """An llguidance tokenizer for a k2 tokenizer: each id's bytes, special tokens marked special (a grammar names
    them as ``<|name|>``), end of sequence = the chat stop tokens (``k2.data.chat.stop_token_ids``)."""
    specials = {i: s for s, i in tokenizer.special_tokens.items()}
    ranks = getattr(tokenizer, "mergeable_ranks", None)  # tiktoken: bytes of every base id without 163k calls
    by_id = {i: b for b, i in ranks.items()} if ranks is not None else None
    tokens: list[bytes] = []
    special_ids: list[int] = []
    for i in range(tokenizer.vocab_size):
        if i in specials:
            tokens.append(specials[i].encode("utf-8"))
            special_ids.append(i)
        elif by_id is not None:
            tokens.append(by_id.get(i, b""))
            if i not in by_id:  # a gap in the vocabulary: never allowed by text
                special_ids.append(i)
        else:
            tokens.append(tokenizer.decode_bytes([i]))
    stops = list(chat.stop_token_ids(tokenizer)) or [tokenizer.eos_id]

    class _Source:  # what llguidance.TokenizerWrapper reads
        eos_token_id = stops[0]
        bos_token_id = None
        special_token_ids = special_ids

        def __init__(self) -> None:
            self.tokens = tokens

        def __call__(self, text: str | bytes) -> list[int]:
            return tokenizer.encode(text.decode("utf-8") if isinstance(text, bytes) else text)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Source()), eos_token=stops)


class Matcher:
    """One sequence's position in a grammar. ``stop_ids``: the tokens that end the sequence where the grammar
    allows it to end (the chat stop tokens)."""

    def __init__(self, matcher: llguidance.LLMatcher, stop_ids: frozenset[int]) -> None:
        self._m = matcher
        self.stop_ids = stop_ids

    def advance(self, token_id: int) -> None:
        """Consume a sampled token (one the last mask allowed)."""
        if not self._m.consume_token(token_id):
            raise RuntimeError(f"grammar matcher rejected token {token_id}: {self._m.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and takes no further token: the sequence must stop."""
        return self._m.is_stopped()

    @property
    def accepting(self) -> bool:
        """The output so far is a complete sentence of the grammar (it may still go on)."""
        return self._m.is_accepting()


class GrammarCompiler:
    """Compiles grammars for one tokenizer, caches them by grammar text (LRU) and fills batched token masks."""

    def __init__(self, tokenizer: Tokenizer, cache_size: int = _GRAMMAR_CACHE_SIZE) -> None:
        self.tokenizer = llg_tokenizer(tokenizer)
        self.vocab_size = tokenizer.vocab_size
        self.stop_ids = frozenset(self.tokenizer.eos_tokens)
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._executor = llguidance.LLExecutor(num_threads=max(1, min(8, (os.cpu_count() or 2) // 2)))

    def matcher(self, grammar: Grammar) -> Matcher:
        """A fresh matcher at the start of ``grammar``; :class:`GrammarError` if it does not compile for this
        tokenizer (e.g. it names a special token the tokenizer lacks)."""
        base = self._cache.get(grammar.text)
        if base is None:
            base = llguidance.LLMatcher(self.tokenizer, grammar.text, log_level=0)
            if base.is_error():
                raise GrammarError(f"grammar does not compile: {base.get_error().strip().splitlines()[0]}")
            self._cache[grammar.text] = base
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(grammar.text)
        return Matcher(base.deep_copy(), self.stop_ids)

    def allowed(self, matchers: Sequence[Matcher], vocab_size: int, device: torch.device) -> torch.Tensor:
        """``[R, vocab_size]`` bool on ``device``: the tokens each matcher allows next (ids at or beyond the
        tokenizer's vocabulary never are). Masks are computed in parallel on llguidance's threads."""
        words = (max(vocab_size, self.vocab_size) + 31) // 32
        bits = torch.zeros(len(matchers), words, dtype=torch.int32)  # [R, W], bit b of word w = token 32·w + b
        jobs = [(m._m, row) for row, m in enumerate(matchers)]
        self._executor.unsafe_compute_mask_ptr(jobs, bits.data_ptr(), words * 4, len(matchers))
        bits = bits.to(device)
        shifts = torch.arange(32, device=device, dtype=torch.int32)
        allowed = ((bits[:, :, None] >> shifts) & 1).bool().view(len(matchers), -1)  # [R, 32·W]
        return allowed[:, :vocab_size]
