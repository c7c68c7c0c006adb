"""PNG plots of a ``k2 rl`` run: reward (mean and per environment), response length and held-out accuracy over
iterations, read from ``RUN_DIR/metrics.jsonl``."""

from __future__ import annotations

import math
import os
from pathlib import Path

from k2.train.metrics import read_metrics
from k2.train.plot import save_figure


def plot_rl(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Write ``reward.png`` and ``length.png`` into ``out_dir`` (default ``RUN_DIR/plots``); returns them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train" and "reward_mean" in r]
    evals = [r for r in records if r.get("kind") == "eval" and r.get("heldout_accuracy") is not None]
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        written.append(save_figure(fig, out / name))

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None and not math.isnan(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*series("reward_mean"), "o-", ms=3, label="mean reward")
    for key in sorted({k for r in train for k in r if k.startswith("reward_") and k[7:8] != "m" and "std" not in k}):
        ax.plot(*series(key), lw=0.8, alpha=0.7, label=key.removeprefix("reward_"))
    if evals:
        ax.plot([r["step"] for r in evals], [r["heldout_accuracy"] for r in evals], "s--", label="held-out accuracy")
    ax.set(xlabel="iteration", ylabel="reward", title=f"reward — {run_dir.name}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, "reward.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(*series("response_length"), "o-", ms=3, label="mean response length (action tokens)")
    ax.plot(*series("truncated_fraction"), lw=0.8, label="truncated fraction", color="red")
    ax.set(xlabel="iteration", title="response length")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, "length.png")
    return written
