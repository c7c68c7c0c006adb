"""RL rollouts on separate ``k2 serve`` processes: ``/v1/completions`` with token-id prompts against the in-process
engine (greedy and seeded, through the real ``openai`` client and plain HTTP); a server paused by a weight sync
serves nothing until the whole model has arrived, then answers with the new weights; ``k2 rl`` with
``rl.rollout=servers`` end to end (log-prob mismatch ~0 after every sync although the weights move, no server
process left afterwards, --resume restarts the server with the run's latest weights)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from k2.data import chat
from k2.data.tokenizer import ByteTokenizer
from k2.errors import ConfigError
from k2.infer import Engine, SamplingParams
from k2.infer.loading import load_checkpoint
from k2.model import Transformer, presets, save_hf
from k2.rl.config import build_rl_config
from k2.rl.loss import token_logprobs
from k2.rl.weight_sync import BroadcastSender, sync_group

pytestmark = pytest.mark.multiproc

MODEL = "k2-tiny"
MAX_SEQ_LEN = 512
CONFIG = presets.get("tiny").replace(num_hidden_layers=1, max_position_embeddings=MAX_SEQ_LEN)


def _tiny(seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(CONFIG)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # clear argmax margins: batched and single runs pick the same tokens
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("remote") / "hf"
    save_hf(_tiny(0), path, dtype=torch.float32)
    ByteTokenizer().save(path)
    return path


@contextlib.contextmanager
def serve_process(checkpoint: Path, model_name: str, max_seq_len: int, extra_args: tuple[str, ...] = ()):
    """``k2 serve`` on port 0; its base URL (``.../v1``) read from ``--port-file``; terminated on exit."""
    port_file = checkpoint.parent / f"port-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "k2.cli", "serve", str(checkpoint), "--port", "0", "--port-file", str(port_file)]
    cmd += ["--model-name", model_name, "--max-seq-len", str(max_seq_len), "--threads", "1", *extra_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not port_file.is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0] if proc.poll() else ""
            time.sleep(0.05)
        yield port_file.read_text().strip() + "/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{url}/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _ids_and_logprobs(choice: dict) -> tuple[list[int], list[float]]:
    lp = choice["logprobs"]
    return [int(t.removeprefix("token_id:")) for t in lp["tokens"]], lp["token_logprobs"]


def _engine_run(model: Transformer, tok, prompt: list[int], **params):
    engine = Engine(model, tok, max_batch_size=1, max_seq_len=MAX_SEQ_LEN)
    stop = (tok.eos_id, *chat.stop_token_ids(tok))
    return engine.generate([prompt], SamplingParams(stop_token_ids=stop, **params))[0]


def test_completions_with_token_ids_match_the_engine(checkpoint):
    import openai

    model, tok = load_checkpoint(checkpoint)
    prompt, _ = chat.render([{"role": "user", "content": "What is 2 + 3?"}], tok, add_generation_prompt=True)
    stop_ids = list(chat.stop_token_ids(tok))
    with serve_process(checkpoint, MODEL, MAX_SEQ_LEN) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", timeout=120, max_retries=0)
        greedy = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            logprobs=2,
            extra_body={"stop_token_ids": stop_ids, "return_tokens_as_token_ids": True},
        )
        seeded = [
            _post(
                url,
                {
                    "model": MODEL,
                    "prompt": [prompt, prompt],
                    "max_tokens": 12,
                    "temperature": 1.0,
                    "top_p": 0.9,
                    "seed": 7,
                    "stop_token_ids": stop_ids,
                    "logprobs": 0,
                    "return_tokens_as_token_ids": True,
                },
            )
            for _ in range(2)
        ]
    ref = _engine_run(model, tok, prompt, max_new_tokens=12, temperature=0)
    choice = greedy.choices[0]
    assert [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens] == ref.token_ids
    torch.testing.assert_close(choice.logprobs.token_logprobs, ref.logprobs, atol=1e-4, rtol=0)
    assert choice.text == ref.text and choice.finish_reason == ref.finish_reason
    for top, lp in zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs, strict=True):
        assert len(top) in (2, 3) and max(top.values()) >= lp - 1e-6  # the 2 most likely and the sampled one
    assert greedy.usage.prompt_tokens == len(prompt) and greedy.usage.completion_tokens == len(ref.token_ids)

    ref = _engine_run(model, tok, prompt, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    assert seeded[0] == {**seeded[1], "id": seeded[0]["id"], "created": seeded[0]["created"]}  # same seed, same answer
    for choice in seeded[0]["choices"]:  # a batch of two prompts: both with seed 7
        ids, lps = _ids_and_logprobs(choice)
        assert ids == ref.token_ids
        torch.testing.assert_close(lps, ref.logprobs, atol=1e-4, rtol=0)


def test_a_sync_pauses_the_server_until_every_weight_has_arrived(checkpoint, tmp_path):
    """The trainer announces a sync and holds back the buckets: a request sent meanwhile is not served; once the
    buckets arrive it is answered with the new weights (a different greedy answer than the old weights give)."""
    _, tok = load_checkpoint(checkpoint)
    new = _tiny(1)
    prompt, _ = chat.render([{"role": "user", "content": "Hi"}], tok, add_generation_prompt=True)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 0}
    body["return_tokens_as_token_ids"] = True
    init = f"file://{tmp_path / 'init'}"
    sync = ["--sync-init", init, "--sync-rank", "1", "--sync-world-size", "2"]
    with serve_process(checkpoint, MODEL, MAX_SEQ_LEN, tuple(sync)) as url:
        old_ids, _ = _ids_and_logprobs(_post(url, body)["choices"][0])
        sender = BroadcastSender(
            new, group=sync_group(init, 0, 2, datetime.timedelta(seconds=60)), bucket_bytes=1 << 16
        )
        sender.start(1)  # every server has paused its engine
        answer: dict = {}
        request = threading.Thread(target=lambda: answer.update(_post(url, body)))
        request.start()
        time.sleep(2.0)
        assert not answer and request.is_alive()  # queued behind the sync
        sender.send()
        request.join(60)
        new_ids, new_lps = _ids_and_logprobs(answer["choices"][0])
        sender.close()
    ref = _engine_run(new, tok, prompt, max_new_tokens=8, temperature=0)
    assert new_ids == ref.token_ids and new_ids != old_ids
    torch.testing.assert_close(new_lps, ref.logprobs, atol=1e-4, rtol=0)


def test_servers_refuse_partial_rollouts():
    with pytest.raises(ConfigError, match="rollout_budget"):
        build_rl_config(overrides=["rl.rollout=servers", "rl.rollout_budget=10"])


def _server_processes(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_k2_rl_with_a_rollout_server(checkpoint, tmp_path):
    run = tmp_path / "run"
    args = ["--from", str(checkpoint), "--run-dir", str(run)]
    for item in (
        "rl.rollout=servers", "rl.rollout_servers=1", "rl.iterations=2", "rl.prompts_per_iteration=2",
        "rl.samples_per_prompt=2", "rl.max_response_tokens=8", "rl.envs=arith", "rl.heldout_problems=2",
        "rl.ptx_batch_size=1", "optim.lr=0.02",
    ):  # fmt: skip
        args += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def k2_rl(*args: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "k2.cli", "rl", *args], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]

    k2_rl(*args)
    # --resume restarts the server from the starting checkpoint and sends it the run's latest weights.
    k2_rl("--resume", str(run), "--set", "rl.iterations=3")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    # Iterations 2 and 3 sample on the server with the weights of the previous update: the trainer's recomputed
    # log-probs equal the server's, although the updates moved them by far more than that.
    assert all(r["mismatch_max"] < 1e-4 for r in train), [r["mismatch_max"] for r in train]
    start, _ = load_checkpoint(checkpoint)
    final, _ = load_checkpoint(run / "hf")
    ids = torch.randint(0, CONFIG.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        moved = (token_logprobs(start, ids) - token_logprobs(final, ids)).abs().max()
    assert moved > 1e-2
    assert "joined the weight-sync group" in (run / "servers" / "server1.log").read_text()
    assert _server_processes(str(run / "servers")) == []
