"""The K2 report's Figure 2 at CPU scale: plain Muon lets attention max logits grow; MuonClip caps them at τ.

Trains the ``tiny`` k2 model twice from the same initialisation on the same batches of the built-in synthetic
corpus (``k2.data.corpus``, byte tokenizer), with a learning rate high enough that attention logits run away:
once with ``MuonClip(qk_clip_tau=None)`` (plain Muon + AdamW) and once with QK-Clip at ``--tau``. Each step
records the largest pre-softmax logit over all layers and heads of that step's training forward (softmax scale
included, ``model.max_attention_logits()``) and the training loss; the held-out loss on fixed batches is
recorded every ``--eval-every`` steps. For the clipped run the same batch is also re-run right after the step.
As in the report, γ = τ / S_max comes from the forward *before* the update and is applied *after* it, so both
curves sit above τ by one update's logit growth (negligible at K2's lr, visible at this deliberately high one);
``python_tests/test_qk_clip.py`` checks the exact cap with the update switched off. Writes
``muonclip_logits.png`` (max logit and loss vs step, both optimizers) and ``muonclip_logits.json`` into ``--out``.

    python tools/muonclip_logits.py --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from k2.data.corpus import generate
from k2.data.tokenizer import ByteTokenizer
from k2.model import Transformer, presets
from k2.optim import MuonClip


def token_stream(num_documents: int, seed: int) -> torch.Tensor:
    tok = ByteTokenizer()
    ids: list[int] = []
    for doc in generate(num_documents, seed=seed):
        ids.extend(tok.encode(doc))
        ids.append(tok.eos_id)
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq - 1, (steps, batch), generator=gen)
    return [torch.stack([stream[s : s + seq + 1] for s in row.tolist()]) for row in starts]


def train(args: argparse.Namespace, tau: float | None, train_batches, eval_batches) -> dict:
    torch.manual_seed(args.seed)
    model = Transformer(presets.get(args.preset))
    opt = MuonClip.from_model(model, lr=args.lr, weight_decay=args.weight_decay, qk_clip_tau=tau)
    out: dict = {"tau": tau, "max_logit": [], "loss": [], "clipped_heads": [], "eval_step": [], "eval_loss": []}
    out["max_logit_after_clip"] = []  # clipped run: the same batch re-run right after the step
    t0 = time.perf_counter()
    for step, ids in enumerate(train_batches):
        model.train()
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        model.zero_grad()
        loss.backward()
        out["max_logit"].append(float(model.max_attention_logits().max()))  # this step's forward, before the clip
        opt.step()  # QK-Clip consumes the recorded logits
        model.reset_max_attention_logits()  # (and so does this, for the run without QK-Clip)
        out["loss"].append(float(loss.detach()))
        out["clipped_heads"].append(int(opt.last_qk_clip["clipped_heads"].sum()) if tau is not None else 0)
        if tau is not None:
            with torch.no_grad():
                model.loss(ids[:, :-1], ids[:, 1:])  # training mode: records this batch's logits again
            out["max_logit_after_clip"].append(float(model.max_attention_logits().max()))
            model.reset_max_attention_logits()
        if (step + 1) % args.eval_every == 0 or step + 1 == len(train_batches):
            model.eval()
            with torch.no_grad():
                held_out = sum(float(model.loss(e[:, :-1], e[:, 1:])) for e in eval_batches) / len(eval_batches)
            out["eval_step"].append(step + 1)
            out["eval_loss"].append(held_out)
            print(
                f"tau={tau} step {step + 1:4d}  loss {out['loss'][-1]:.3f}  eval {held_out:.3f}  "
                f"max logit {out['max_logit'][-1]:8.2f}  ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    return out


def plot(runs: dict, tau: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_logit, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for label, run in runs.items():
        ax_logit.plot(run["max_logit"], label=f"{label}: training forward")
        if run["max_logit_after_clip"]:
            ax_logit.plot(run["max_logit_after_clip"], label=f"{label}: same batch after the step", lw=0.8)
        ax_loss.plot(run["loss"], label=f"{label} (train)", alpha=0.5)
        ax_loss.plot(run["eval_step"], run["eval_loss"], marker="o", label=f"{label} (held-out)")
    ax_logit.axhline(tau, color="gray", linestyle="--", label=f"τ = {tau:g}")
    ax_logit.set(xlabel="step", ylabel="max attention logit (all layers, heads)", yscale="log")
    ax_logit.set_title("max logit per step")
    ax_loss.set(xlabel="step", ylabel="cross-entropy")
    ax_loss.set_title("loss")
    for ax in (ax_logit, ax_loss):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _atomic(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
    plt.close(fig)


def _atomic(path: str, write, binary: bool = False) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("wb" if binary else "w", dir=directory, delete=False, suffix=".tmp") as f:
        write(f)
    os.replace(f.name, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--tau", type=float, default=20.0)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--documents", type=int, default=800, help="synthetic documents to draw batches from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny tensors: 1 is fastest)")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    stream = token_stream(args.documents, seed=args.seed)
    split = int(stream.numel() * 0.9)
    train_batches = batches(stream[:split], args.steps, args.batch, args.seq, args.seed)
    eval_batches = batches(stream[split:], 4, args.batch, args.seq, args.seed + 1)
    runs = {"Muon": train(args, None, train_batches, eval_batches)}
    runs[f"MuonClip (τ={args.tau:g})"] = train(args, args.tau, train_batches, eval_batches)

    plain, clip = runs.values()
    tail = max(1, args.steps // 10)
    summary = {
        "muon_peak_max_logit": max(plain["max_logit"]),
        "muonclip_peak_max_logit": max(clip["max_logit"]),
        "muonclip_peak_max_logit_after_first_clip": max(
            (m for i, m in enumerate(clip["max_logit"]) if any(clip["clipped_heads"][:i])), default=None
        ),
        "muonclip_peak_max_logit_after_clip_same_batch": max(clip["max_logit_after_clip"]),
        "steps_with_clipping": sum(1 for c in clip["clipped_heads"] if c),
        "muon_final_eval_loss": plain["eval_loss"][-1],
        "muonclip_final_eval_loss": clip["eval_loss"][-1],
        "muon_train_loss_last_10pct": sum(plain["loss"][-tail:]) / tail,
        "muonclip_train_loss_last_10pct": sum(clip["loss"][-tail:]) / tail,
    }
    result = {"config": vars(args), "summary": summary, "runs": runs}
    _atomic(os.path.join(args.out, "muonclip_logits.json"), lambda f: json.dump(result, f, indent=1))
    plot(runs, args.tau, os.path.join(args.out, "muonclip_logits.png"))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
