"""SFT data: chat records → checked, rendered, loss-masked conversations → training rows (padded or packed).

Legend: B rows of a batch, S tokens per row (the longest row of the batch), T tokens of one conversation.

Records are the OpenAI chat format the field uses, one per JSONL line or parquet row:
``{"messages": [...], "tools": [...]}``, assistant ``tool_calls`` (``function.arguments`` a JSON string or an
object), ``role: "tool"`` results with ``tool_call_id``, tools as OpenAI functions, bare functions or MCP tools
(``inputSchema``) exactly as ``k2 serve`` accepts them. Parquet columns ``messages`` / ``tools`` hold lists of
structs or JSON strings.

``check_record`` turns every problem a user can fix into one ``DataError`` line naming the file and line (or
parquet row): a malformed line, a missing or non-list ``messages``, an unknown role, a tool whose schema is not a
JSON Schema, a tool call to an undeclared tool or with arguments that are not a JSON object, a conversation with
no assistant turn. A conversation longer than the context is skipped and counted, or an error
(``too_long``); nothing is truncated, so no assistant turn is ever cut in half.

Rendering is ``k2.data.chat.render`` (Kimi-K2 format, loss mask on what the assistant produces: its content, the
tool-call section and its ``<|im_end|>``). A conversation of T tokens gives T-1 positions: input ``ids[:-1]``,
labels ``ids[1:]`` where the mask is 1, else -100.

Rows: ``pack=False`` puts one conversation in each row; a batch is padded (``[PAD]``, label -100) to its longest
row. ``pack=True`` fills rows of ``context_len`` first-fit, longest conversation first; each conversation is a
document (``cu_seqlens``, positions restarting at 0, ``k2.model.document_layout``), so attention never crosses
conversations and every conversation's loss is the one it has alone in a row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from k2.data import chat, readers
from k2.data.tokenizer import Tokenizer
from k2.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Record:
    where: str  # "FILE:LINE", "FILE:row N" or "built-in dialogue N", for messages
    messages: list[dict[str, Any]]
    tools: list[Any]

    def as_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "tools": self.tools}


# ---- reading ----------------------------------------------------------------------------------------------------


def _from_json_string(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"a JSON string that does not parse ({e.msg})") from None
    return value


def _drop_nulls(value: Any) -> Any:
    """Parquet structs have every field of the column, None where a record lacks it: drop those."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _record(where: str, raw: Any) -> Record:
    if not isinstance(raw, Mapping):
        raise DataError(f"{where}: expected a JSON object with 'messages', got {type(raw).__name__}")
    if "messages" not in raw:
        raise DataError(f"{where}: no 'messages' (found {sorted(raw)})")
    try:
        messages = _from_json_string(raw["messages"])
        tools = _from_json_string(raw.get("tools")) or []
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    if not isinstance(tools, list):
        raise DataError(f"{where}: 'tools' must be a list")
    return Record(where, messages, tools)


def _read_jsonl(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            yield _record(f"{path}:{lineno}", raw)


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if "messages" not in names:
        raise DataError(f"{path}: no column 'messages' (found {names})")
    columns = ["messages"] + (["tools"] if "tools" in names else [])
    row = 0
    for batch in pf.iter_batches(columns=columns, batch_size=1024):
        for values in zip(*(batch.column(c).to_pylist() for c in columns), strict=True):
            raw = {c: _drop_nulls(v) for c, v in zip(columns, values, strict=True)}
            yield _record(f"{path}:row {row}", raw)
            row += 1


def read_records(path: str | os.PathLike[str]) -> Iterator[Record]:
    """The chat records under ``path`` (a ``.jsonl`` / ``.parquet`` file or a directory of them, sorted)."""
    files = [f for f in readers.list_files(path) if f.suffix in (".jsonl", ".parquet")]
    if not files:
        raise DataError(f"no .jsonl or .parquet chat files in {path}")
    for f in files:
        n = 0
        for record in _read_jsonl(f) if f.suffix == ".jsonl" else _read_parquet(f):
            n += 1
            yield record
        if n == 0:
            raise DataError(f"empty file: {f}")


# ---- checking -----------------------------------------------------------------------------------------------------


def tool_schemas(tools: Sequence[Any], where: str = "tools") -> dict[str, dict[str, Any]]:
    """Declared tool name → its argument JSON Schema (``{}`` when it declares none); ``DataError`` for a tool
    without a name or with a schema that is not a valid JSON Schema."""
    import jsonschema

    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        try:
            fn = chat.tool_function(tool, i)
        except DataError as e:
            raise DataError(f"{where}: {str(e).removeprefix('chat.render: ')}") from None
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: tools[{i}] has no function name")
        schema = fn.get("parameters", fn.get("inputSchema")) or {}
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise DataError(f"{where}: tools[{i}] ({name}): not a valid JSON Schema: {e.message}") from None
        out[name] = schema
    return out


def call_arguments(call: Any) -> Any:
    """A tool call's arguments as a value (``function.arguments`` is a JSON string or an object); raises
    ``ValueError`` when the string does not parse."""
    args = call["function"].get("arguments", "{}")
    return json.loads(args) if isinstance(args, str) else args


def check_record(record: Record) -> None:
    """Raise one ``DataError`` line naming ``record.where`` for anything that makes the record unusable."""
    w = record.where
    declared = tool_schemas(record.tools, w)
    has_assistant = False
    for i, msg in enumerate(record.messages):
        if not isinstance(msg, Mapping) or "role" not in msg:
            raise DataError(f"{w}: messages[{i}] must be an object with a 'role'")
        role = msg["role"]
        if role not in ROLES:
            raise DataError(f"{w}: messages[{i}]: unknown role {role!r} (system, user, assistant or tool)")
        if role != "assistant":
            continue
        has_assistant = True
        calls = msg.get("tool_calls") or []
        if not isinstance(calls, list):
            raise DataError(f"{w}: messages[{i}].tool_calls must be a list")
        for j, call in enumerate(calls):
            cw = f"{w}: messages[{i}].tool_calls[{j}]"
            fn = call.get("function") if isinstance(call, Mapping) else None
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                raise DataError(f"{cw} must have function.name")
            if fn["name"] not in declared:
                known = ", ".join(declared) or "none"
                raise DataError(f"{cw} calls {fn['name']!r}, which is not a declared tool (declared: {known})")
            try:
                args = call_arguments(call)
            except ValueError as e:
                raise DataError(f"{cw} ({fn['name']}): arguments are not valid JSON ({e})") from None
            if not isinstance(args, dict):
                raise DataError(f"{cw} ({fn['name']}): arguments must be a JSON object")
    if not has_assistant:
        raise DataError(f"{w}: the conversation has no assistant turn (nothing to learn from)")


# ---- conversations and rows --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conversation:
    ids: np.ndarray  # [T] int32, the rendered conversation
    mask: np.ndarray  # [T] bool, tokens the assistant produces
    record: int  # index of its record

    def __len__(self) -> int:
        """Positions it takes in a row: T - 1 (the last token is only a label)."""
        return len(self.ids) - 1


def encode(
    records: Sequence[Record],
    tokenizer: Tokenizer,
    context_len: int,
    *,
    too_long: Literal["skip", "error"] = "skip",
    limit: str = "data.context_len",
) -> tuple[list[Conversation], int]:
    """Check and render ``records``; returns the conversations and how many were skipped as longer than
    ``context_len`` positions (``limit`` says where that number comes from, for the message)."""
    out: list[Conversation] = []
    skipped = 0
    for i, r in enumerate(records):
        check_record(r)
        try:
            ids, mask = chat.render(r.messages, tokenizer, tools=r.tools or None)
        except DataError as e:
            raise DataError(f"{r.where}: {str(e).removeprefix('chat.render: ')}") from None
        if len(ids) - 1 > context_len:
            if too_long == "error":
                raise DataError(
                    f"{r.where}: the conversation has {len(ids)} tokens, more than {limit}={context_len} + 1 "
                    '(data.too_long="skip" skips such conversations)'
                )
            skipped += 1
            continue
        out.append(Conversation(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool), i))
    return out, skipped


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices, each with total length <= ``capacity``: first fit, longest first (ties by index)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        b = next((k for k, r in enumerate(room) if r >= n), None)
        if b is None:
            bins.append([i])
            room.append(capacity - n)
        else:
            bins[b].append(i)
            room[b] -= n
    return bins


class SFTRows:
    """Conversations laid out in rows; ``batch(indices)`` gives ``(input_ids [B,S], labels [B,S])`` and, when packed,
    a third element ``{"positions": [B,S], "cu_seqlens": [N+1]}`` for ``Transformer.loss``. Duck-types
    ``k2.data.packing.PackedSequences`` for ``BatchIterator`` and ``eval_batches``."""

    def __init__(self, conversations: Sequence[Conversation], context_len: int, *, pack: bool, pad_id: int) -> None:
        self.conversations = list(conversations)
        self.context_len, self.pack, self.pad_id = context_len, pack, pad_id
        lengths = [len(c) for c in self.conversations]
        if any(n > context_len for n in lengths):
            raise ValueError("SFTRows: a conversation is longer than context_len")
        self.rows = first_fit(lengths, context_len) if pack else [[i] for i in range(len(lengths))]

    def __len__(self) -> int:
        return len(self.rows)

    def num_tokens(self, indices: Sequence[int] | np.ndarray) -> int:
        """Real (not padding) positions of the given rows."""
        return sum(len(self.conversations[c]) for i in indices for c in self.rows[int(i)])

    def batch(self, indices: Sequence[int] | np.ndarray) -> tuple[Any, ...]:
        rows = [[self.conversations[c] for c in self.rows[int(i)]] for i in indices]
        lengths = [[len(c) for c in row] for row in rows]
        s = max(sum(n) for n in lengths)
        x = torch.full((len(rows), s), self.pad_id, dtype=torch.long)  # [B, S]
        y = torch.full((len(rows), s), IGNORE_INDEX, dtype=torch.long)  # [B, S]
        for b, row in enumerate(rows):
            at = 0
            for c in row:
                n = len(c)
                ids = torch.from_numpy(c.ids.astype(np.int64))
                x[b, at : at + n] = ids[:-1]
                y[b, at : at + n] = torch.where(torch.from_numpy(c.mask[1:]), ids[1:], IGNORE_INDEX)
                at += n
        if not self.pack:
            return x, y
        from k2.model import document_layout

        positions, cu_seqlens = document_layout(lengths, s)
        return x, y, {"positions": positions, "cu_seqlens": cu_seqlens}
