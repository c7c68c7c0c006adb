"""The generation engine: continuous batching over the MLA latent cache.

Dimension legend: B rows of one forward, S prompt tokens (padded), V vocabulary.

Requests wait in a FIFO queue; at most ``max_batch_size`` run at once, each in one cache slot. Every
:meth:`Engine.step` either
- admits waiting requests (while slots are free and the padded prefill stays within ``max_prefill_tokens``) and
  prefills them together: one ``Transformer`` forward over their prompts, right-padded, through the model's
  cache protocol and its expanded MLA path; then samples each one's first token; or
- decodes one token for every running request: one model forward with S == 1 (the model's absorbed MLA decode
  over the latent cache, ``k2.ops.mla_decode``).
Admission comes first, so a new request waits at most one step; finished requests free their slot at once and
the running set is kept in slots ``0..n-1`` (see ``k2.infer.cache``).

A request ends on a stop token (kept as its last token id, left out of the text), a stop string (text cut before
it, token ids up to the one that completed it), ``max_new_tokens`` or a full cache slot (``finish_reason``
``"stop"`` or ``"length"``). Every generated token comes with its log-prob under the model (fp32, before
a grammar's mask, temperature and filters; see ``k2.infer.sampling``).

A request may carry a grammar (``SamplingParams.grammar``, see ``k2.infer.grammar``): its matcher is compiled at
``add_request`` (cached per grammar text), masks the disallowed tokens of that row before sampling, advances on each
token, and ends the request (``"stop"``) once the grammar is complete; the last token is then the grammar's last,
or one of the chat stop tokens where the grammar ends with an optional part. Rows without a grammar pay nothing.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from k2.data.tokenizer import Tokenizer
from k2.infer.cache import LatentCache
from k2.infer.detok import IncrementalDetokenizer
from k2.infer.grammar import Grammar, GrammarCompiler, Matcher
from k2.infer.sampling import sample
from k2.model import Transformer


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (``top_k <= 0`` and ``top_p == 1`` disable those filters)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    top_logprobs: int = 0
    grammar: Grammar | None = None  # constrain the output to this grammar (needs an Engine with a tokenizer)

    def __post_init__(self) -> None:
        checks = (
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_logprobs", 0 <= self.top_logprobs <= 20, "in [0, 20]"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {name} must be {expected}, got {getattr(self, name)!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclass
class TokenEvent:
    """One generated token of one request, as :meth:`Engine.step` reports it."""

    request_id: str
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]  # (token id, log-prob), most likely first; empty unless requested
    text: str  # newly released text (may be empty while a character or a possible stop string is incomplete)
    finish_reason: str | None  # None while running, else "stop" or "length"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    text: str
    finish_reason: str


@dataclass(eq=False)
class _Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    detok: IncrementalDetokenizer | None
    matcher: Matcher | None
    token_ids: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.token_ids)


class Engine:
    """Batched generation for a k2 ``Transformer`` (in eval mode; its device and dtype are used as they are)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None = None,
        *,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        max_prefill_tokens: int = 8192,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_seq_len = min(max_seq_len or 4096, model.config.max_position_embeddings)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        param = next(model.parameters())
        self.device = param.device
        self.cache = LatentCache(model.config, max_batch_size, self.max_seq_len, dtype=param.dtype, device=param.device)
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # _running[i] occupies cache slot i
        self._ids = itertools.count()
        self._grammars: GrammarCompiler | None = None  # built on the first request with a grammar

    # ---- requests ----------------------------------------------------------------------------------------------

    def add_request(
        self, prompt_ids: Sequence[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue a request; returns its id. Raises ``ValueError`` if the prompt is empty, has ids outside the
        vocabulary, or leaves no room for one new token in ``max_seq_len``, or if its grammar does not compile
        (``k2.infer.grammar.GrammarError``)."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        vocab = self.model.config.vocab_size
        if not prompt:
            raise ValueError("Engine.add_request: the prompt is empty")
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"Engine.add_request: prompt token ids must be in the vocabulary [0, {vocab})")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(
                f"Engine.add_request: prompt of {len(prompt)} tokens leaves no room in max_seq_len {self.max_seq_len}"
            )
        if (params.stop or params.grammar) and self.tokenizer is None:
            raise ValueError("Engine.add_request: stop strings and grammars need an Engine with a tokenizer")
        matcher = None
        if params.grammar is not None:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer)
            matcher = self._grammars.matcher(params.grammar)
        seed = params.seed if params.seed is not None else random.SystemRandom().getrandbits(63)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        detok = IncrementalDetokenizer(self.tokenizer, params.stop) if self.tokenizer is not None else None
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        self._waiting.append(_Sequence(request_id, prompt, params, generator, detok, matcher))
        return request_id

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request; returns whether it was found."""
        for seq in self._waiting:
            if seq.request_id == request_id:
                self._waiting.remove(seq)
                return True
        for seq in self._running:
            if seq.request_id == request_id:
                self._retire([seq])
                return True
        return False

    def generator(self, request_id: str) -> torch.Generator:
        """The sampling generator of a waiting or running request: saving its state and restoring it into a new
        request continues the same random stream (an RL rollout paused and resumed later)."""
        for seq in (*self._waiting, *self._running):
            if seq.request_id == request_id:
                return seq.generator
        raise KeyError(f"Engine.generator: no waiting or running request {request_id!r}")

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_running(self) -> int:
        return len(self._running)

    # ---- stepping ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Run one prefill or one decode forward; one event per request that got a token."""
        admitted = self._admit()
        if admitted:
            seqs, logits = admitted, self._prefill(admitted)
        elif self._running:
            seqs, logits = self._running, self._decode()
        else:
            return []
        events = self._sample_and_append(seqs, logits)
        self._retire([s for s, e in zip(seqs, events, strict=True) if e.finished])
        return events

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
            longest = max([len(self._waiting[0].prompt_ids)] + [len(s.prompt_ids) for s in admitted])
            if admitted and longest * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            admitted.append(self._waiting.popleft())
        return admitted

    def _prefill(self, seqs: list[_Sequence]) -> torch.Tensor:
        first = len(self._running)
        self._running.extend(seqs)
        lengths = [len(s.prompt_ids) for s in seqs]
        s_max = max(lengths)
        ids = torch.zeros(len(seqs), s_max, dtype=torch.long)  # [B, S], right-padded with token 0
        for row, seq in enumerate(seqs):
            ids[row, : lengths[row]] = torch.tensor(seq.prompt_ids)
        ids = ids.to(self.device)
        positions = torch.arange(s_max, device=self.device).expand(len(seqs), -1)  # [B, S]
        self.cache.bind(first, [0] * len(seqs), s_max, lengths)
        hidden = self.model.hidden_states(ids, positions, self.cache)  # [B, S, D]
        last = torch.tensor(lengths, device=self.device) - 1
        return self.model.lm_head(hidden[torch.arange(len(seqs), device=self.device), last])  # [B, V]

    def _decode(self) -> torch.Tensor:
        seqs = self._running
        tokens = torch.tensor([s.token_ids[-1] for s in seqs], device=self.device)  # [B]
        starts = [s.length - 1 for s in seqs]  # position of each row's newest token, not yet cached
        positions = torch.tensor(starts, device=self.device)
        self.cache.bind(0, starts, 1)
        return self.model(tokens[:, None], positions[:, None], self.cache)[:, 0]

    def _sample_and_append(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[TokenEvent]:
        p = [s.params for s in seqs]
        num_top = max(x.top_logprobs for x in p)
        constrained = [row for row, s in enumerate(seqs) if s.matcher is not None]
        mask = None
        if constrained:
            matchers = [seqs[row].matcher for row in constrained]
            mask = self._grammars.allowed(matchers, logits.shape[1], logits.device)  # [R, V]
        out = sample(
            logits,
            [x.temperature for x in p],
            [x.top_p for x in p],
            [x.top_k for x in p],
            [s.generator for s in seqs],
            num_top,
            constrained,
            mask,
        )
        tokens, logprobs = out.tokens.tolist(), out.logprobs.tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        events = []
        for row, seq in enumerate(seqs):
            token = tokens[row]
            seq.token_ids.append(token)
            finish, text = None, ""
            if seq.matcher is not None:
                seq.matcher.advance(token)
            if token in seq.params.stop_token_ids or (seq.matcher is not None and token in seq.matcher.stop_ids):
                finish = "stop"
            elif seq.detok is not None:
                text = seq.detok.push(token)
                finish = "stop" if seq.detok.stopped else None
            if finish is None and seq.matcher is not None and seq.matcher.done:
                finish = "stop"
            if finish is None and (len(seq.token_ids) >= seq.params.max_new_tokens or seq.length >= self.max_seq_len):
                finish = "length"
            if finish is not None and seq.detok is not None:
                text += seq.detok.flush()
            k = seq.params.top_logprobs
            top = list(zip(top_ids[row][:k], top_lps[row][:k], strict=True)) if k else []
            events.append(TokenEvent(seq.request_id, token, logprobs[row], top, text, finish))
        return events

    def _retire(self, done: list[_Sequence]) -> None:
        """Free the slots of finished sequences, moving the last running sequences into the holes."""
        for seq in done:
            slot = self._running.index(seq)
            last = len(self._running) - 1
            if slot != last:
                self.cache.move(last, slot)
                self._running[slot] = self._running[last]
            else:
                self.cache.free(slot)
            self._running.pop()

    # ---- convenience -------------------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[Completion]:
        """Run ``prompts`` to completion (batched), in order. ``params``: one for all, or one per prompt."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"Engine.generate: {len(prompts)} prompts but {len(params)} SamplingParams")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        results = {i: Completion(i, list(p), [], [], [], "", "") for i, p in zip(ids, prompts, strict=True)}
        pending = set(ids)
        while pending:
            for ev in self.step():
                c = results.get(ev.request_id)
                if c is None:
                    continue
                c.token_ids.append(ev.token_id)
                c.logprobs.append(ev.logprob)
                c.top_logprobs.append(ev.top_logprobs)
                c.text += ev.text
                if ev.finished:
                    c.finish_reason = ev.finish_reason
                    pending.discard(ev.request_id)
        return [results[i] for i in ids]

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """Generate for one prompt, yielding each token's event as it is produced (other queued requests run too)."""
        request_id = self.add_request(prompt_ids, params)
        try:
            while True:
                for ev in self.step():
                    if ev.request_id == request_id:
                        yield ev
                        if ev.finished:
                            return
        finally:
            self.abort(request_id)
