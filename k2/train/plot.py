"""PNG curves of a run from its ``metrics.jsonl`` (matplotlib, headless Agg backend).

- ``loss.png``: training loss per step and held-out loss at each evaluation, with the unigram baseline from
  ``summary.json`` when present (log-scaled step axis is not used: WSD phases read better on a linear one);
- ``max_logit.png``: per-layer max attention logit (what QK-Clip caps), with τ when QK-Clip is on;
- ``load_imbalance.png``: per-MoE-layer expert-load imbalance (max load / mean load; 1 = perfectly balanced);
- ``lr.png``: the learning-rate schedule as applied;
- ``tool_calls.png`` (runs that measure them, ``k2 sft``): held-out tool-call validity and exact-call accuracy at
  each evaluation, step 0 being the starting checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from k2.errors import DataError
from k2.train.metrics import METRICS_FILE, read_metrics

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[Any]]:
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _per_layer(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[list[float]]]:
    rows = [(r["step"], r[key]) for r in records if r.get(key)]
    if not rows:
        return [], []
    n = max(len(v) for _, v in rows)
    steps = [s for s, v in rows if len(v) == n]
    layers = [[v[i] for s, v in rows if len(v) == n] for i in range(n)]
    return steps, layers


def plot_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Render the PNGs of ``run_dir`` into ``out_dir`` (default ``RUN_DIR/plots``); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise DataError(f"no {METRICS_FILE} in {run_dir}: not a k2 pretrain run directory")
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        raise DataError(f"{run_dir / METRICS_FILE} holds no training records yet")
    summary = _read_json(run_dir / "summary.json")
    tau = _qk_clip_tau(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        written.append(save_figure(fig, out / name))

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, loss = _series(train, "loss")
    ax.plot(steps, loss, lw=0.8, alpha=0.8, label="train loss")
    steps, eval_loss = _series(evals, "eval_loss")
    if steps:
        ax.plot(steps, eval_loss, "o-", ms=4, label="held-out loss")
    if summary.get("baseline_loss") is not None:
        ax.axhline(summary["baseline_loss"], ls="--", c="gray", lw=1, label="unigram baseline")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=f"loss — {run_dir.name}")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "loss.png")

    steps, layers = _per_layer(train, "max_logit")
    if layers:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, values in enumerate(layers):
            ax.plot(steps, values, lw=0.8, label=f"layer {i}")
        if tau:
            ax.axhline(tau, ls="--", c="red", lw=1, label=f"QK-Clip τ = {tau:g}")
        ax.set(xlabel="step", ylabel="max attention logit", title="max pre-softmax logit per layer")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        save(fig, "max_logit.png")

    steps, layers = _per_layer(train, "load_imbalance")
    if layers:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, values in enumerate(layers):
            ax.plot(steps, values, lw=0.8, label=f"MoE layer {i}")
        ax.axhline(1.0, ls="--", c="gray", lw=1)
        ax.set(xlabel="step", ylabel="max load / mean load", title="expert-load imbalance")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        save(fig, "load_imbalance.png")

    steps, validity = _series(evals, "tool_call_validity")
    if steps:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, validity, "o-", ms=4, label="valid calls (parse, declared name, schema)")
        steps, exact = _series(evals, "tool_call_exact")
        ax.plot(steps, exact, "s--", ms=4, label="exact calls (same calls as the reference)")
        ax.set(xlabel="step", ylabel="fraction of held-out tool turns", ylim=(-0.02, 1.02), title="tool calls")
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, "tool_calls.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    steps, lr = _series(train, "lr")
    ax.plot(steps, lr)
    ax.set(xlabel="step", ylabel="learning rate", title="schedule")
    ax.grid(alpha=0.3)
    save(fig, "lr.png")
    return written


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` to ``path`` atomically (a temporary file renamed into place) and close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _qk_clip_tau(run_dir: Path) -> float | None:
    try:
        optim = tomllib.loads((run_dir / "config.toml").read_text()).get("optim", {})
    except (OSError, tomllib.TOMLDecodeError):
        return None
    if optim.get("name", "muonclip") != "muonclip":
        return None
    return optim.get("qk_clip_tau") or None
