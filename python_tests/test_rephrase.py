"""``k2 rephrase`` against a scripted OpenAI-compatible server on loopback: chunking, each chunk's prompt holding the
rewrite so far, fidelity rejections dropped, the cap of N rephrasings per document, back-end failures counted and
retried by the next run, the output read by ``k2 pretrain``'s data loader, ``--dry-run``, and a run killed with
SIGKILL and rerun giving exactly the records of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _fake_openai import fake_openai, fake_openai_process

from k2.agentic import OpenAIBackend
from k2.agentic.rephrase import (
    DROPPED_SUFFIX,
    JUDGE_SYSTEM,
    REWRITE_SYSTEM,
    STYLES,
    RephraseConfig,
    rephrase,
    split_chunks,
    styles_for,
    token_counter,
)
from k2.agentic.store import JsonlStore
from k2.data.tokenizer import ByteTokenizer
from k2.model import Transformer, presets, save_hf
from k2.train.config import DataSection
from k2.train.data import build_data

HERE = Path(__file__).resolve()
PASSAGE = re.compile(r"to rewrite:\n<<<\n(.*)\n>>>\Z", re.S)
CONTEXT = re.compile(r"The rewrite so far \(its end\):\n<<<\n(.*?)\n>>>\n\nPassage", re.S)
ORIGINAL = re.compile(r"\AOriginal:\n<<<\n(.*?)\n>>>\n\nRewrite:", re.S)


def rewrite_of(chunk: str) -> str:
    """What the scripted model answers for a passage: a deterministic function of it."""
    return "R<" + " ".join(chunk.split()).upper() + ">"


def script(req: dict) -> object:
    """Rewrites by :func:`rewrite_of`; judges a chunk unfaithful if its original mentions "forbidden"; fails
    every request about "broken" with HTTP 500."""
    system, user = req["messages"][0]["content"], req["messages"][1]["content"]
    if "broken" in user:
        return ("status", 500)
    if system == REWRITE_SYSTEM:
        return ("text", rewrite_of(PASSAGE.search(user)[1]))
    assert system == JUDGE_SYSTEM and req["response_format"]["type"] == "json_schema"
    faithful = "forbidden" not in ORIGINAL.search(user)[1]
    return {"faithful": faithful, "reason": "same facts" if faithful else "invents a claim"}


def slow_script(req: dict) -> object:
    """:func:`script`, 50 ms late (so a run can be killed part-way)."""
    return ("sleep", 0.05, script(req))


def _long_doc(topic: str, sentences: int) -> str:
    return " ".join(f"Sentence {i} about {topic} has some words in it." for i in range(sentences))


DOCS = [
    _long_doc("cats", 30),
    "A short note.\n\nWith a second paragraph.",
    _long_doc("rivers", 6) + " Then a forbidden claim appears. " + _long_doc("trees", 6),
    _long_doc("maths", 12),
]


def _write_input(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d, "meta": i}) + "\n" for i, d in enumerate(docs)))
    return path


def _records(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in JsonlStore(path).records()} if path.exists() else {}


def _backend(url: str) -> OpenAIBackend:
    return OpenAIBackend(url, timeout_s=5.0, max_retries=1, backoff_s=0.01)


# ---- chunking ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", [None, ByteTokenizer()], ids=["approx", "byte"])
def test_split_chunks_cover_the_text_at_sentence_ends(tokenizer):
    count = token_counter(tokenizer)
    text = DOCS[0] + "\nA new line starts here.\n\n" + "unpunctuated words " * 60 + "end"
    chunks = split_chunks(text, 48, count)
    assert "".join(chunks) == text and len(chunks) > 3
    assert all(count(c) <= 48 for c in chunks)
    sentence_chunks = [c for c in chunks if "unpunctuated" not in c]
    assert all(re.search(r"[.!?\n]\s*\Z", c) for c in sentence_chunks[:-1])  # cut after a sentence or a line


def test_split_chunks_edge_cases():
    count = token_counter(None)
    assert split_chunks("One sentence.", 16, count) == ["One sentence."]
    word = "x" * 400  # longer than a chunk: stays whole
    assert split_chunks(f"a {word} b", 16, count) == ["a ", f"{word} ", "b"]
    assert token_counter(None)("abcde") == 2  # ceil(5 / 4)


# ---- a full run -----------------------------------------------------------------------------------------------


def _cfg(tmp_path: Path, **kw) -> RephraseConfig:
    kw = {"max_rephrasings": 3, "chunk_tokens": 64, "seed": 5, "concurrency": 3, **kw}
    return RephraseConfig(input=str(_write_input(tmp_path / "in.jsonl", DOCS)), output=tmp_path / "out.jsonl", **kw)


def test_rephrase_content(tmp_path):
    cfg = _cfg(tmp_path)
    count = token_counter(None)
    with fake_openai(script) as srv:
        stats = rephrase(_backend(srv.url), cfg)
        requests = list(srv.requests)
    kept, dropped = _records(cfg.output), _records(Path(f"{cfg.output}{DROPPED_SUFFIX}"))

    by_source: dict[str, list[dict]] = {}
    for r in kept.values():
        by_source.setdefault(r["source_id"], []).append(r)
    assert len(by_source) == 3 and all(len(rs) == 3 for rs in by_source.values())  # N = 3, the forbidden doc dropped
    for rs in by_source.values():
        assert sorted(r["rephrasing"] for r in rs) == [0, 1, 2]
        assert [r["style"] for r in sorted(rs, key=lambda r: r["rephrasing"])] == list(
            styles_for(cfg, rs[0]["source_id"])
        )
        assert len({r["style"] for r in rs}) == 3 and all(r["style"] in STYLES for r in rs)
    texts = {r["text"] for r in kept.values()}
    for doc in (DOCS[0], DOCS[1], DOCS[3]):
        chunks = split_chunks(doc, 64, count)
        sep = ["" if i == 0 else "\n\n" if chunks[i - 1].endswith("\n\n") else " " for i in range(len(chunks))]
        assert "".join(s + rewrite_of(c) for s, c in zip(sep, chunks, strict=True)) in texts
    assert {len(split_chunks(DOCS[0], 64, count))} == {r["chunks"] for r in kept.values() if r["text"].count("CATS")}

    assert len(dropped) == 3 and all("invents a claim" in r["dropped"] for r in dropped.values())
    forbidden_chunk = next(i for i, c in enumerate(split_chunks(DOCS[2], 64, count)) if "forbidden" in c)
    assert {r["chunk"] for r in dropped.values()} == {forbidden_chunk} and forbidden_chunk > 0

    # each rewrite's prompt holds the end of the rewrite so far (about chunk_tokens of it)
    rewrites = [r for r in requests if r["messages"][0]["content"] == REWRITE_SYSTEM]
    conditioned = 0
    for r in rewrites:
        user = r["messages"][1]["content"]
        index = int(re.search(r"Passage (\d+) of \d+ to rewrite", user)[1]) - 1
        context = CONTEXT.search(user)[1]
        if index == 0:
            assert context == "(none: this is the first passage)"
            continue
        doc = next(d for d in DOCS if PASSAGE.search(user)[1] in d)
        so_far = " ".join(rewrite_of(c) for c in split_chunks(doc, 64, count)[:index])
        assert so_far.endswith(context) and (context == so_far or count(context) > 64 - 8)
        conditioned += 1
    assert conditioned > 10

    n_chunks = sum(3 * len(split_chunks(d, 64, count)) for d in (DOCS[0], DOCS[1], DOCS[3])) + 3 * (forbidden_chunk + 1)
    assert stats.as_dict() | {"usage": None} == {
        "documents": 4,
        "rephrasings": 12,
        "existing": 0,
        "chunks": n_chunks,
        "kept": 9,
        "rejected_fidelity": 3,
        "failed": {},
        "failure_examples": {},
        "usage": None,
    }
    assert stats.usage["requests"] == len(requests) == 2 * n_chunks  # one rewrite and one verdict per chunk
    assert stats.usage["prompt_tokens"] == sum(len(m["content"]) for r in requests for m in r["messages"])

    # k2 pretrain reads the output as data.path
    data = build_data(DataSection(path=str(cfg.output), context_len=32, heldout_fraction=0.3), vocab_size=512)
    assert data.num_documents == 9

    # a second run finds everything done and sends nothing
    with fake_openai(script) as srv:
        again = rephrase(_backend(srv.url), cfg)
        assert srv.requests == []
    assert (again.existing, again.kept, again.rejected) == (12, 0, 0)
    assert _records(cfg.output) == kept


def test_backend_failures_are_counted_and_retried_by_the_next_run(tmp_path):
    docs = ["This one is fine.", "This one is broken for now.", "Also fine."]
    cfg = RephraseConfig(
        input=str(_write_input(tmp_path / "in.jsonl", docs)), output=tmp_path / "out.jsonl", max_rephrasings=2
    )
    with fake_openai(script) as srv:
        stats = rephrase(_backend(srv.url), cfg)
    assert (stats.kept, stats.rejected, dict(stats.failed)) == (4, 0, {"http_5xx": 2})
    assert "HTTP 500" in stats.failure_examples["http_5xx"]
    assert not any("BROKEN" in r["text"] for r in _records(cfg.output).values())

    healed = lambda req: script(json.loads(json.dumps(req).replace("broken", "mended")))  # noqa: E731
    with fake_openai(healed) as srv:
        stats = rephrase(_backend(srv.url), cfg)
    assert (stats.existing, stats.kept, dict(stats.failed)) == (4, 2, {})
    assert sum("MENDED" in r["text"] for r in _records(cfg.output).values()) == 2


# ---- the command ------------------------------------------------------------------------------------------------


def _k2(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "k2.cli", *args], capture_output=True, text=True, timeout=120, **kw)


def test_dry_run_prints_prompts_and_sends_nothing(tmp_path):
    cfg = _cfg(tmp_path)
    with fake_openai(script) as srv:
        args = ["-o", str(cfg.output), "--backend", srv.url, "--chunk-tokens", "64", "--max-rephrasings", "2"]
        out = _k2("rephrase", cfg.input, *args, "--dry-run")
        assert srv.requests == []
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    n_chunks = sum(len(split_chunks(d, 64, token_counter(None))) for d in DOCS)
    assert len(lines) == 2 * 2 * n_chunks and {line["kind"] for line in lines} == {"rewrite", "judge"}
    assert all(line["messages"][0]["content"] in (REWRITE_SYSTEM, JUDGE_SYSTEM) for line in lines)
    assert not cfg.output.exists()


def test_bad_arguments_are_one_error_line(tmp_path):
    src = _write_input(tmp_path / "in.jsonl", DOCS)
    out = _k2("rephrase", str(src), "-o", str(tmp_path / "out.txt"), "--backend", "http://127.0.0.1:1/v1")
    assert out.returncode == 2 and out.stderr.strip().startswith("k2 rephrase: error:") and ".jsonl" in out.stderr
    out = _k2("rephrase", str(src), "-o", str(tmp_path / "out.jsonl"))
    assert out.returncode == 2 and "--backend" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_rephrase_with_a_k2_checkpoint_in_process(tmp_path):
    """A random tiny model rewrites nonsense, but its verdicts are constrained JSON: nothing fails to parse."""
    torch.manual_seed(0)
    config = presets.tiny().replace(max_position_embeddings=4096)  # room for rewrites full of byte garbage
    save_hf(Transformer(config), tmp_path / "ckpt", dtype=torch.float32)
    ByteTokenizer().save(tmp_path / "ckpt")
    src = _write_input(tmp_path / "in.jsonl", ["First sentence here. Second one there.", "Another short text."])
    stats_file = tmp_path / "stats.json"
    args = ["--backend", str(tmp_path / "ckpt"), "--chunk-tokens", "16", "--max-rephrasings", "1"]
    args += ["--stats-json", str(stats_file)]
    out = _k2("rephrase", str(src), "-o", str(tmp_path / "out.jsonl"), *args, "--threads", "1")
    assert out.returncode == 0, out.stderr
    assert "chunks counted with a k2 tokenizer" in out.stdout
    stats = json.loads(stats_file.read_text())
    assert stats["backend"] == f"engine:{tmp_path / 'ckpt'}" and stats["failed"] == {}, stats
    assert stats["documents"] == 2 and stats["kept"] + stats["rejected_fidelity"] == stats["rephrasings"] == 2
    assert stats["usage"]["requests"] >= 2 and stats["usage"]["completion_tokens"] > 0


@pytest.mark.slow
def test_sigkill_and_rerun_gives_the_records_of_an_uninterrupted_run(tmp_path):
    docs = [f"Document {d}. " + _long_doc(f"topic {d}", 8) for d in range(5)] + ["A forbidden one."]
    src = _write_input(tmp_path / "in.jsonl", docs)
    args = ["--max-rephrasings", "3", "--chunk-tokens", "48", "--seed", "11", "--concurrency", "2"]

    ref_out = tmp_path / "ref" / "out.jsonl"
    reference = RephraseConfig(str(src), ref_out, max_rephrasings=3, chunk_tokens=48, seed=11, concurrency=4)
    with fake_openai(script) as srv:
        rephrase(_backend(srv.url), reference)

    out = tmp_path / "killed" / "out.jsonl"
    with fake_openai_process(f"{HERE}:slow_script", tmp_path / "srv") as srv:
        cmd = [sys.executable, "-m", "k2.cli", "rephrase", str(src), "-o", str(out), "--backend", srv.url, *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while not (out.exists() and out.read_text().count("\n") >= 3) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        partial = _records(out)
        assert 3 <= len(partial) < 15  # killed part-way
        rerun = _k2("rephrase", str(src), "-o", str(out), "--backend", srv.url, *args)
        assert rerun.returncode == 0, rerun.stderr

    assert "k2 rephrase:" in rerun.stdout and "kept" in rerun.stdout
    assert _records(out) == _records(reference.output) and len(_records(out)) == 15
    dropped = Path(f"{out}{DROPPED_SUFFIX}")
    assert _records(dropped) == _records(Path(f"{reference.output}{DROPPED_SUFFIX}")) and len(_records(dropped)) == 3
    assert out.read_text().count("\n") == 15  # no duplicates, no torn lines
