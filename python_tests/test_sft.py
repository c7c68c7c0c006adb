"""``k2 sft`` / ``k2.train.sft`` on a micro model: what a run records (tool-call metrics before and after, plots,
export), the export in transformers, packing with document masks = one conversation per row, SIGKILL + ``--resume``
reproducing the losses, bad inputs as one-line errors that leave runs untouched, the default ``--from``, and the
``k2 chat --tools`` loop."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _k2_cli import k2, kill_at_step, losses, snapshot
from test_train_checkpoint import MICRO_MODEL

from k2.commands.chat import load_tools, reply
from k2.data import ByteTokenizer, toolgen
from k2.data.sft import IGNORE_INDEX, Record, SFTRows, encode
from k2.errors import ConfigError, DataError
from k2.model import Transformer, load_hf, save_hf
from k2.train.config import SFTConfig, build_config
from k2.train.metrics import read_metrics
from k2.train.sft import latest_pretrain_export, sft

pytestmark = pytest.mark.usefixtures("one_thread")

MICRO_SFT = [
    "data.generated=300",  # ~40 with tools (the rest is short tool-free arithmetic)
    "data.heldout_fraction=0.15",
    "train.batch_size=2",
    "train.steps=12",
    "train.checkpoint_every=3",
    "optim.warmup_steps=1",
    "eval.every=6",
    "eval.max_sequences=4",
    "eval.tool_turns=3",
    "eval.max_new_tokens=8",
    "checkpoint.hf_dtype=float32",
]
SETS = [arg for item in MICRO_SFT for arg in ("--set", item)]


def _micro_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(build_config(overrides=MICRO_MODEL).model.build())


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pre-trained checkpoint as ``k2 pretrain`` exports it: HF safetensors + config.json + tokenizer."""
    path = tmp_path_factory.mktemp("base") / "hf"
    save_hf(_micro_model(), path, dtype=torch.float32)
    ByteTokenizer().save(path)
    return path


@pytest.fixture(scope="module")
def finished_run(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("sft") / "full"
    r = k2("sft", "--from", base, "--run-dir", run, *SETS)
    assert r.returncode == 0, r.stderr
    assert f"run directory  {run}" in r.stdout and "tool calls     validity" in r.stdout
    return run


def test_a_run_records_tool_call_metrics_before_and_after(finished_run: Path, base: Path) -> None:
    summary = json.loads((finished_run / "summary.json").read_text())
    for key in ("tool_call_validity", "tool_call_exact", "tool_call_validity_start", "tool_call_exact_start"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["tool_turns"] == 3 and summary["steps"] == 12 and summary["base_model"] == str(base.resolve())
    assert summary["train_conversations"] + summary["heldout_conversations"] == 300
    evals = [r for r in read_metrics(finished_run) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert all({"eval_loss", "tool_call_validity", "tool_call_exact"} <= set(r) for r in evals)
    assert summary["eval_loss"] == evals[-1]["eval_loss"] and summary["eval_loss_start"] == evals[0]["eval_loss"]
    assert (finished_run / "plots" / "tool_calls.png").is_file() and (finished_run / "plots" / "loss.png").is_file()
    assert f'path = "{base.resolve()}"' in (finished_run / "config.toml").read_text()


def test_the_export_loads_in_transformers_with_equal_logits(finished_run: Path) -> None:
    from transformers import DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM.from_pretrained(finished_run / "hf", dtype=torch.float32).eval()
    ours = load_hf(finished_run / "hf")
    x = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=1e-4)
    assert not torch.equal(ours.embed_tokens.weight, _micro_model().embed_tokens.weight)  # it was fine-tuned


def test_packing_with_document_masks_gives_the_per_conversation_losses_of_one_per_row() -> None:
    tok = ByteTokenizer()
    records = [Record(str(i), d["messages"], d["tools"]) for i, d in enumerate(toolgen.generate(7, seed=5))]
    convs, _ = encode(records, tok, 1024)
    packed = SFTRows(convs, 2048, pack=True, pad_id=tok.pad_id)
    single = SFTRows(convs, 1024, pack=False, pad_id=tok.pad_id)
    assert len(packed) < len(convs)
    model = _micro_model().eval()
    x, y, layout = packed.batch(range(len(packed)))
    with torch.no_grad():
        for row, members in enumerate(packed.rows):
            start = 0
            for c in members:
                n = len(convs[c])
                y_c = torch.full_like(y, IGNORE_INDEX)  # the loss of conversation c alone, inside the packed batch
                y_c[row, start : start + n] = y[row, start : start + n]
                x1, y1 = single.batch([c])
                torch.testing.assert_close(model.loss(x, y_c, **layout), model.loss(x1, y1), rtol=1e-5, atol=1e-6)
                start += n


def test_sigkill_then_resume_reproduces_the_losses(finished_run: Path, base: Path, tmp_path: Path) -> None:
    run = tmp_path / "killed"
    kill_at = random.Random().randint(4, 8)  # after the first checkpoint (step 3), before the end
    kill_at_step(["sft", "--from", base, "--run-dir", run, *SETS], run, kill_at)
    assert not (run / "summary.json").exists()

    r = k2("sft", "--resume", run)
    assert r.returncode == 0, r.stderr
    assert losses(run) == losses(finished_run)  # every step, bit for bit
    for key in ("eval_loss", "tool_call_validity", "tool_call_exact"):
        assert losses(run, "eval", key) == losses(finished_run, "eval", key)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] is not None and summary["tool_call_validity_start"] is not None


def _one_line_error(r: subprocess.CompletedProcess, expected: str) -> None:
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("k2 sft: error: ") and expected in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
CALC = toolgen.TOOLS["calculator"]


@pytest.mark.parametrize(
    ("line", "settings", "expected"),
    [
        ('{"messages": [', [], "data.jsonl:3: invalid JSON"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, [], "data.jsonl:3: messages[0]: unknown role 'wizard'"),
        (
            {
                "tools": [CALC],
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "1", "type": "function", "function": {"name": "rm_rf", "arguments": "{}"}}
                        ],
                    }
                ],
            },
            [],
            "data.jsonl:3: messages[0].tool_calls[0] calls 'rm_rf', which is not a declared tool",
        ),
        ({"messages": [{"role": "user", "content": "anyone?"}]}, [], "data.jsonl:3: the conversation has no assistant"),
        (
            {"messages": [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y"}]},
            ["data.context_len=256", "data.too_long=error"],
            "data.jsonl:3: the conversation has",
        ),
    ],
    ids=["malformed-line", "unknown-role", "undeclared-tool", "no-assistant", "too-long"],
)
def test_bad_input_is_one_error_and_leaves_runs_untouched(
    base: Path, finished_run: Path, tmp_path: Path, line: dict | str, settings: list[str], expected: str
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(
        "\n".join([json.dumps(GOOD), json.dumps(GOOD), line if isinstance(line, str) else json.dumps(line)])
    )
    config = build_config(
        overrides=[*MICRO_SFT, f"model.path={base}", f"data.path={data}", *settings], schema=SFTConfig
    )
    before = snapshot(finished_run)
    with pytest.raises(DataError) as e:
        sft(config, finished_run, resume=True)
    assert str(e.value).startswith(str(data)) and expected in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError):
        sft(config, tmp_path / "new")
    assert snapshot(finished_run) == before and not (tmp_path / "new").exists()
    if line == '{"messages": [':  # and through the command: one line on stderr
        _one_line_error(k2("sft", "--resume", finished_run, "--set", f"data.path={data}"), expected)
        assert snapshot(finished_run) == before


def test_too_long_conversations_are_skipped_and_counted(base: Path, tmp_path: Path) -> None:
    long = {"messages": [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y"}]}
    data = tmp_path / "data.jsonl"
    many = [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
        for i in range(30)
    ]
    data.write_text("\n".join(json.dumps(r) for r in [GOOD, long, *many]) + "\n")
    extra = ["data.context_len=256", "train.steps=2", "eval.tool_turns=0", "checkpoint.export_hf=false"]
    where = f"model.path={base.parent}"  # a run directory stands for its hf/ export
    config = build_config(overrides=[*MICRO_SFT, where, f"data.path={data}", *extra], schema=SFTConfig)
    summary = sft(config, tmp_path / "run")
    assert summary["skipped_too_long"] == 1 and "tool_call_validity" not in summary
    assert summary["base_model"] == str(base.resolve())


def test_default_from_is_the_latest_pretrain_export(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match=r"no k2 pretrain run .* make one with `k2 pretrain`"):
        latest_pretrain_export(runs)
    for i, (name, model) in enumerate([("a", 'preset = "tiny"'), ("b", 'preset = "tiny"'), ("c-sft", 'path = "/x"')]):
        (runs / name / "hf").mkdir(parents=True)
        (runs / name / "config.toml").write_text(f"[model]\n{model}\n")
        (runs / name / "hf" / "config.json").write_text("{}")
        os.utime(runs / name / "hf" / "config.json", (1000 + i, 1000 + i))
    assert latest_pretrain_export(runs) == runs / "b" / "hf"
    r = k2("sft", cwd=tmp_path / "runs" / "a")  # a directory without runs/ of its own
    _one_line_error(r, "no k2 pretrain run with a Hugging Face export in")


class _ScriptedEngine:
    """Stands in for ``k2.infer.Engine``: each ``stream`` call yields the next scripted completion token by token."""

    def __init__(self, replies: list[str]) -> None:
        self.tokenizer, self.max_seq_len, self.replies, self.prompts = ByteTokenizer(), 4096, list(replies), []

    def stream(self, ids, params):
        self.prompts.append(self.tokenizer.decode(ids))
        text = self.replies.pop(0)
        for token in self.tokenizer.encode(text, allow_special=True):  # ASCII: one character or marker per token
            yield SimpleNamespace(text=self.tokenizer.decode([token]))


def test_chat_tools_option(tmp_path: Path) -> None:
    assert [t["function"]["name"] for t in load_tools("builtin")[0]] == list(toolgen.TOOLS)
    tools, executor = load_tools("get_weather, calculator")
    assert [t["function"]["name"] for t in tools] == ["calculator", "get_weather"]
    assert executor("calculator", {"expression": "6 * 7"}) == "42"
    spec = tmp_path / "tools.json"
    spec.write_text(json.dumps([{"name": "search", "inputSchema": {"type": "object"}}]))
    assert load_tools(str(spec)) == ([{"name": "search", "inputSchema": {"type": "object"}}], None)
    with pytest.raises(DataError, match="expected 'builtin', built-in tool names"):
        load_tools("calculator,teleport")


def test_chat_runs_the_builtin_tools() -> None:
    tools, executor = load_tools("builtin")
    call = "<|tool_calls_section_begin|><|tool_call_begin|>functions.kv_set:0<|tool_call_argument_begin|>"
    engine = _ScriptedEngine(
        [
            call + '{"key": "pin", "value": "42"}<|tool_call_end|><|tool_calls_section_end|>',
            "Saved.",
            "<|tool_calls_section_begin|><|tool_call_begin|>functions.kv_get:1<|tool_call_argument_begin|>"
            '{"key": "pin"}<|tool_call_end|><|tool_calls_section_end|>',
            "Your pin is 42.",
        ]
    )
    history, out, notes = [], io.StringIO(), []
    for question in ("Remember my pin: 42", "What is my pin?"):
        history.append({"role": "user", "content": question})
        reply(
            engine, history, [], lambda: None, tools=tools, executor=executor, max_rounds=4, out=out, note=notes.append
        )
    text = out.getvalue()
    assert '-> kv_set {"key": "pin", "value": "42"}\n<- ok\nSaved.\n' in text
    assert '-> kv_get {"key": "pin"}\n<- 42\nYour pin is 42.\n' in text and not notes
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"] * 2
    assert "## Return of functions.kv_get:1\n42" in engine.prompts[-1] and '"name":"get_weather"' in engine.prompts[0]
