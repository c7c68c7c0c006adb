"""``k2 rephrase``: rewrite pre-training text with an LLM, chunk by chunk, keeping only faithful rewrites.

See ``k2.agentic.rephrase`` (Kimi K2 report, arXiv 2507.20534 §2.2). The back end is any OpenAI-compatible server
(``--backend http://host:port/v1``: vLLM, SGLang, ``k2 serve``) or a k2 checkpoint / run directory loaded in process.
The output ``.jsonl`` is what ``k2 pretrain`` reads as ``data.path``; rerunning the command resumes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rephrase", help="rephrase pre-training text with an LLM (chunk-wise, fidelity-checked)")
    p.add_argument("input", help="a .txt/.jsonl/.parquet file or a directory of them (as k2 pretrain reads)")
    p.add_argument("--output", "-o", required=True, help="the .jsonl of kept rephrasings (resumed if it exists)")
    p.add_argument("--backend", help="http(s)://HOST:PORT/v1, or a checkpoint or run directory")
    p.add_argument("--model", help="model id on the server (default: the first GET /v1/models lists)")
    p.add_argument("--tokenizer", help="k2 tokenizer for chunking (default: the engine's, else ~4 chars/token)")
    p.add_argument("--text-field", default="text", help=".jsonl key / .parquet column (default: text)")
    p.add_argument("--txt-split", default="file", choices=("file", "paragraph", "line"), help="documents of a .txt")
    p.add_argument("--max-rephrasings", type=int, default=2, help="rephrasings per document (default: 2)")
    p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per rewritten chunk (default: 256)")
    p.add_argument("--max-documents", type=int, default=0, help="only the first N documents (default: all)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the rewrites")
    p.add_argument("--seed", type=int, default=0, help="seed of the style choices and sampling seeds")
    p.add_argument("--concurrency", type=int, default=8, help="rephrasings in flight at once")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request before it is retried")
    p.add_argument("--max-retries", type=int, default=3, help="retries of a failed request")
    p.add_argument("--device", default="cpu", help="torch device of a checkpoint back end (default: cpu)")
    p.add_argument("--threads", type=int, help="torch CPU threads of a checkpoint back end (default: torch's choice)")
    p.add_argument("--dry-run", action="store_true", help="print the prompts as JSON lines; send nothing")
    p.add_argument("--stats-json", help="also write the run's statistics to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from k2.agentic.backend import EngineBackend, checkpoint_dir, make_backend
    from k2.agentic.rephrase import RephraseConfig, format_stats, rephrase
    from k2.commands._inference_args import set_threads
    from k2.data.tokenizer import load_tokenizer
    from k2.errors import ConfigError

    cfg = RephraseConfig(
        input=args.input,
        output=Path(args.output),
        text_field=args.text_field,
        txt_split=args.txt_split,
        max_rephrasings=args.max_rephrasings,
        chunk_tokens=args.chunk_tokens,
        seed=args.seed,
        temperature=args.temperature,
        concurrency=args.concurrency,
        max_documents=args.max_documents,
    )
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if args.dry_run:
        if tokenizer is None and args.backend and not args.backend.startswith(("http://", "https://")):
            tokenizer = load_tokenizer(checkpoint_dir(Path(args.backend)))
        rephrase(None, cfg, tokenizer=tokenizer, dry_run=sys.stdout)
        return 0
    if not args.backend:
        raise ConfigError("--backend URL|DIR is required (or --dry-run)")
    set_threads(args)
    backend = make_backend(
        args.backend,
        model=args.model,
        concurrency=args.concurrency,
        timeout_s=args.timeout,
        max_retries=args.max_retries,
        device=args.device,
    )
    if tokenizer is None and isinstance(backend, EngineBackend):
        tokenizer = backend.tokenizer
    try:
        stats = rephrase(backend, cfg, tokenizer=tokenizer)
    finally:
        if isinstance(backend, EngineBackend):
            backend.close()
    counting = "k2 tokenizer" if tokenizer is not None else "~4 characters per token"
    print(f"k2 rephrase: {format_stats(stats)} (chunks counted with a {counting}) -> {cfg.output}")
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps({"backend": backend.name, **stats.as_dict()}, indent=2) + "\n")
    return 0
