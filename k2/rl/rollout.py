"""Rollouts with exact token ids, and partial rollouts through a replay buffer (Kimi K1.5 §2.6.2, Kimi K2 §3.2).

Dimension legend: P prompt groups per iteration, K samples per prompt.

A :class:`Trajectory` is one episode of one environment as the trainer sees it: the token ids of the whole
context (rendered prompt, the policy's turns exactly as the engine sampled them, tool/environment observations),
a 0/1 action mask (1 only on tokens the policy sampled), the engine's log-prob of every action token and the
policy version (iteration) that sampled it. Training uses these ids as they are; nothing is re-tokenised.

:func:`rollout` drives an engine over many episodes at once (continuous batching): a ``k2.infer.Engine`` in the
trainer's process, or ``k2.rl.remote.RemoteEngine`` over rollout servers (both are a :class:`RolloutEngine`). Each
running turn is one engine request; when it ends (a stop id, or its share of the per-response token budget), the
turn's ids go to ``env.step`` and either the episode ends or the observation is appended and the next turn is
queued.

Partial rollouts: an iteration generates at most ``budget`` tokens in total. When it is spent, every running turn is
paused: its tokens so far (with their log-probs and version) stay in the trajectory, and the sampling generator's
state is saved, so the next iteration continues the same turn with the next random draw; with unchanged weights the
continued rollout equals an uninterrupted one token for token (tested). Groups (the K samples of a prompt) are
trained on only when all K episodes have ended, because the K1.5 baseline is the group's mean reward.

Staleness rule: a group whose oldest action token was sampled by the policy of iteration v is dropped at iteration
i when ``i − v > max_staleness``. Otherwise each part is trained on with the log-probs of the policy that produced it
(``logprobs`` per token), which is π_old of the K1.5 loss for that part.
A paused episode keeps its request's sampling-generator state (``Engine.generator``), so its continuation draws
what the uninterrupted episode would have drawn.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from k2.infer.engine import SamplingParams, TokenEvent
from k2.rl.env import Env


class RolloutEngine(Protocol):
    """What :func:`rollout` needs of an engine. ``step`` returns the tokens generated since the last call (a request's
    tokens in order, the last one with its ``finish_reason``); partial rollouts also call ``generator(request_id)``
    (the request's ``torch.Generator``, whose state pauses and resumes it), which ``k2.infer.Engine`` has."""

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> str: ...

    def step(self) -> list[TokenEvent]: ...

    def abort(self, request_id: str) -> bool: ...


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (stable across runs and machines, unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class Trajectory:
    env: str  # environment name
    group: int  # prompt group id (unique over the run)
    seed: int  # the environment's reset seed
    sample_seed: int  # the sampling seed of this episode
    token_ids: list[int]  # the whole context
    mask: list[int]  # 1 on action tokens
    logprobs: list[float]  # the sampling policy's log-prob of each action token (0.0 elsewhere)
    versions: list[int]  # the policy version that sampled each action token (-1 elsewhere)
    turns: list[list[int]] = field(default_factory=list)  # finished turns' action ids (to rebuild the env)
    turn: list[int] = field(default_factory=list)  # action ids of the running turn
    reward: float | None = None
    terminated: bool = False
    truncated: bool = False
    generator_state: str | None = None  # base64 of the paused turn's generator state
    completion: list[dict[str, Any]] = field(default_factory=list)  # the episode's messages (for logs and rewards)

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated

    @property
    def num_actions(self) -> int:
        return sum(self.mask)

    def oldest_version(self) -> int | None:
        versions = [v for v in self.versions if v >= 0]
        return min(versions) if versions else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trajectory:
        return cls(**d)


@dataclass
class RolloutStats:
    generated_tokens: int = 0
    seconds: float = 0.0
    finished: int = 0
    truncated: int = 0
    paused: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def _encode_state(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _decode_state(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rollout(
    engine: RolloutEngine,
    trajectories: Sequence[Trajectory],
    envs: dict[int, Env],
    *,
    version: int,
    temperature: float,
    stop_token_ids: Sequence[int],
    max_response_tokens: Callable[[Trajectory], int],
    budget: int | None = None,
) -> RolloutStats:
    """Advance ``trajectories`` (new or paused; ``envs[id(trajectory)]`` is each one's environment, already reset or
    rebuilt) until each has ended or ``budget`` tokens have been generated in total (checked between engine steps, so up
    to one step more); updates them in place. ``budget`` needs ``engine.generator`` (see :class:`RolloutEngine`).
    ``max_response_tokens(t)``: the episode's budget of action tokens over all its turns (the per-task budget);
    a turn that reaches it ends the episode as truncated."""
    stats = RolloutStats()
    t0 = time.perf_counter()
    running: dict[str, Trajectory] = {}

    def submit(t: Trajectory) -> None:
        left = max_response_tokens(t) - t.num_actions
        if left <= 0:
            _end_turn(t, envs[id(t)], stats, None)
            return
        seed = derive_seed(t.sample_seed, len(t.turns))
        params = SamplingParams(
            max_new_tokens=left, temperature=temperature, seed=seed, stop_token_ids=tuple(stop_token_ids)
        )
        rid = engine.add_request(t.token_ids, params)
        if t.generator_state is not None:  # a paused turn continues its random stream
            engine.generator(rid).set_state(_decode_state(t.generator_state))
            t.generator_state = None
        running[rid] = t

    for t in trajectories:
        if not t.done:
            submit(t)
    while running:
        if budget is not None and stats.generated_tokens >= budget:
            for rid, t in running.items():
                t.generator_state = _encode_state(engine.generator(rid).get_state())
                engine.abort(rid)
                stats.paused += 1
            running.clear()
            break
        for ev in engine.step():
            t = running.get(ev.request_id)
            if t is None:
                continue
            t.token_ids.append(ev.token_id)
            t.mask.append(1)
            t.logprobs.append(ev.logprob)
            t.versions.append(version)
            t.turn.append(ev.token_id)
            stats.generated_tokens += 1
            if ev.finished:
                del running[ev.request_id]
                if _end_turn(t, envs[id(t)], stats, ev.finish_reason):
                    submit(t)
    stats.seconds = time.perf_counter() - t0
    return stats


def _end_turn(t: Trajectory, env: Env, stats: RolloutStats, finish_reason: str | None) -> bool:
    """Hand the finished turn to the environment; True when the episode goes on (its observation appended)."""
    obs, reward, terminated, truncated, info = env.step(t.turn)
    t.turns.append(t.turn)
    t.turn = []
    t.completion = info.get("completion", [])
    if terminated or truncated:
        t.reward, t.terminated, t.truncated = float(reward), bool(terminated), bool(truncated)
        stats.finished += int(terminated)
        stats.truncated += int(truncated)
        return False
    t.token_ids += obs
    t.mask += [0] * len(obs)
    t.logprobs += [0.0] * len(obs)
    t.versions += [-1] * len(obs)
    return True


def start(env: Env, *, name: str, group: int, seed: int, sample_seed: int) -> Trajectory:
    """A new trajectory: ``env.reset(seed)`` and the prompt ids (mask 0)."""
    ids, _ = env.reset(seed)
    n = len(ids)
    return Trajectory(name, group, seed, sample_seed, list(ids), [0] * n, [0.0] * n, [-1] * n)


def rebuild_env(env: Env, t: Trajectory) -> None:
    """Bring a fresh ``env`` to ``t``'s state: reset with its seed and replay its finished turns (environments
    are deterministic given the seed and the actions)."""
    env.reset(t.seed)
    for turn in t.turns:
        env.step(turn)


class ReplayBuffer:
    """Trajectories of groups not yet trained on: paused ones and finished ones whose group is incomplete."""

    def __init__(self, group_size: int, max_staleness: int) -> None:
        self.group_size, self.max_staleness = group_size, max_staleness
        self.trajectories: list[Trajectory] = []

    def __len__(self) -> int:
        return len(self.trajectories)

    def take(self, iteration: int) -> tuple[list[Trajectory], int]:
        """All buffered trajectories of groups still fresh enough at ``iteration`` (and empties the buffer), and
        the number of trajectories dropped as stale."""
        groups: dict[int, list[Trajectory]] = {}
        for t in self.trajectories:
            groups.setdefault(t.group, []).append(t)
        kept, dropped = [], 0
        for members in groups.values():
            versions = [v for t in members if (v := t.oldest_version()) is not None]
            if versions and iteration - min(versions) > self.max_staleness:
                dropped += len(members)
            else:
                kept += members
        self.trajectories = []
        return kept, dropped

    def split(self, trajectories: Sequence[Trajectory]) -> list[list[Trajectory]]:
        """The complete groups (all ``group_size`` episodes ended), each sorted by sample; the rest is buffered."""
        groups: dict[int, list[Trajectory]] = {}
        for t in trajectories:
            groups.setdefault(t.group, []).append(t)
        complete = []
        for gid in sorted(groups):
            members = sorted(groups[gid], key=lambda t: t.sample_seed)
            if len(members) == self.group_size and all(t.done for t in members):
                complete.append(members)
            else:
                self.trajectories += members
        return complete

    def state_dict(self) -> list[dict[str, Any]]:
        return [t.to_dict() for t in self.trajectories]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        self.trajectories = [Trajectory.from_dict(d) for d in state]
