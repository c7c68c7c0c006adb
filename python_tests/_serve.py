"""A real ``k2 serve`` process on loopback for tests: started on a free port, its URL read from its start-up line; and
the random tiny checkpoint the serving tests share."""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from k2.data.tokenizer import ByteTokenizer
from k2.model import Transformer, presets, save_hf


def save_tiny_checkpoint(path: Path) -> None:
    """A random ``tiny`` model (seed 0, fp32) and the byte tokenizer at ``path``; the LM head is sharpened so argmax
    margins are clear and batched and single runs pick the same tokens."""
    torch.manual_seed(0)
    model = Transformer(presets.tiny())
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    save_hf(model, path, dtype=torch.float32)
    ByteTokenizer().save(path)


@contextlib.contextmanager
def serve_process(checkpoint: Path, model_name: str, max_seq_len: int) -> Iterator[str]:
    """Runs ``k2 serve CHECKPOINT`` (one thread, port 0) and yields its base URL; terminates it on exit."""
    cmd = [sys.executable, "-m", "k2.cli", "serve", str(checkpoint), "--port", "0", "--model-name", model_name]
    cmd += ["--max-seq-len", str(max_seq_len), "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    url, seen = None, []
    while url is None:
        try:
            line = lines.get(timeout=120)
        except queue.Empty:
            break
        seen.append(line)
        if line.startswith("k2 serve: model"):
            url = line.split(" at ")[1].split()[0]
    if url is None:
        proc.kill()
        pytest.fail("k2 serve did not start:\n" + "".join(seen))
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
