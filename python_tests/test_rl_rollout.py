"""Environments and rollouts: the chat environment (single turn, tool calls), masks and token ids from the engine
to the trainer, recomputed log-probs vs the engine's, partial rollouts continued next iteration = uninterrupted."""

from __future__ import annotations

import json
import random
import re

import torch

from k2.data import chat, toolgen
from k2.data.tokenizer import ByteTokenizer
from k2.infer.engine import Engine, TokenEvent
from k2.model import Transformer, presets
from k2.rl import rollout as R
from k2.rl.env import ChatEnv, Problem
from k2.rl.loss import token_logprobs
from k2.rl.tasks import ArithmeticTask, builtin_env, exact_answer_reward

TOK = ByteTokenizer()
END = TOK.special_tokens[chat.IM_END]


def _tiny(seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(presets.get("tiny").replace(num_hidden_layers=2)).eval()


def _call_text(expr: str) -> str:
    args = json.dumps({"expression": expr})
    return (
        f"{chat.SECTION_BEGIN}{chat.CALL_BEGIN}functions.calculator:0{chat.ARG_BEGIN}{args}{chat.CALL_END}"
        f"{chat.SECTION_END}"
    )


def test_exact_answer_reward():
    completions = [
        [{"role": "assistant", "content": "The answer is 46."}],
        [{"role": "assistant", "content": "46 or 47"}],
        "It is -3",
        [{"role": "assistant", "content": "no idea"}],
    ]
    assert exact_answer_reward([None] * 4, completions, answer=["46", "46", "-3", "1"]) == [1.0, 0.0, 1.0, 0.0]
    assert exact_answer_reward([None], ["5"], answer=[None]) == [None]


def test_heldout_split_is_disjoint():
    train, held = ArithmeticTask(), ArithmeticTask(heldout=True)
    rng = random.Random(0)
    ans = {(p.messages[0]["content"]) for p in (train.sample(rng) for _ in range(300))}
    held_q = {(p.messages[0]["content"]) for p in (held.sample(rng) for _ in range(100))}
    assert held_q and not ans & held_q


def test_sft_mental_arithmetic_restates_and_never_shows_heldout_problems():
    """The built-in SFT data's tool-free arithmetic: the answer restates the question's expression with its exact
    result (Python integer arithmetic as the oracle), its last number is what the exact-answer reward accepts,
    and no dialogue asks a problem of k2 rl's held-out split."""
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "plus": "+", "minus": "-", "times": "*"}
    pattern = re.compile(r"^(\d) ?([-+*]|plus|minus|times) ?(\d)$")
    held = ArithmeticTask(heldout=True)
    rng = random.Random(1)
    held_qs = {held.sample(rng).messages[0]["content"] for _ in range(400)}
    mental = [d for d in toolgen.generate(600, seed=3) if not d["tools"] and len(d["messages"]) == 2]
    assert len(mental) > 400  # most dialogues are mental arithmetic (short: a minority of the tokens)
    for d in mental:
        question, answer = d["messages"][0]["content"], d["messages"][1]["content"]
        assert question not in held_qs
        core = re.sub(r"^(What is |Compute |calculate )|[?.]$| = \?$", "", question)
        a, op, b = pattern.match(core).groups()
        sym = ops.get(op) if op in ("plus", "minus", "times") else op
        assert answer == f"{a}{sym}{b}={ops[sym](int(a), int(b))}", (question, answer)
        assert exact_answer_reward([None], [answer], answer=[str(ops[sym](int(a), int(b)))]) == [1.0]
    assert len(held_qs) > 20


def test_default_ptx_data_is_tool_use_only():
    """The default PTX rows are built-in dialogues that declare tools (what PTX guards against forgetting), none of
    them the tool-free arithmetic the default RL task grades, and at most 512 of them."""
    from k2.rl.config import build_rl_config
    from k2.rl.loop import ptx_rows

    rows = ptx_rows(build_rl_config(), TOK, 1024)
    assert 400 < len(rows) <= 512
    assert all(TOK.decode(ids[:16]).startswith(f"{chat.IM_SYSTEM}tool_declare") for ids, _ in rows)


def test_single_turn_env():
    env = builtin_env("arith", TOK)
    obs, info = env.reset(seed=3)
    prompt, _ = chat.render(info["messages"], TOK, add_generation_prompt=True)
    assert obs == prompt and info["columns"]["answer"]
    answer = info["columns"]["answer"]
    obs, reward, terminated, truncated, info = env.step([*TOK.encode(f"It is {answer}."), END])
    assert (obs, reward, terminated, truncated) == ([], 1.0, True, False)
    env.reset(seed=3)
    _, reward, terminated, truncated, _ = env.step(f"It is {answer}")  # text action, cut before its stop token
    assert (reward, terminated, truncated) == (1.0, False, True)


def test_tool_env_executes_calls_and_returns_tool_tokens():
    task = ArithmeticTask(tools=True)
    env = ChatEnv(task, TOK, exact_answer_reward, tool_fn=lambda name, args: str(eval(args["expression"])), max_turns=3)
    _, info = env.reset(seed=1)
    answer = info["columns"]["answer"]
    obs, reward, terminated, truncated, info = env.step(_call_text("2 + 3") + chat.IM_END)
    assert (reward, terminated, truncated) == (0.0, False, False)
    tool_msg = {"role": "tool", "tool_call_id": "functions.calculator:0", "name": "calculator", "content": "5"}
    assert obs == chat.render([tool_msg], TOK, add_generation_prompt=True, default_system=None)[0]
    assert info["completion"][-1] == tool_msg
    _, reward, terminated, _, info = env.step(f"The answer is {answer}.{chat.IM_END}")
    assert reward == 1.0 and terminated and len(info["completion"]) == 3


class ScriptedEngine:
    """The three Engine methods ``rollout`` uses, replaying fixed turns (log-prob -1 per token)."""

    def __init__(self, turns: list[list[int]]) -> None:
        self.turns, self.queue, self.seen = list(turns), [], []

    def add_request(self, prompt_ids, params):
        self.seen.append(list(prompt_ids))
        rid = f"r{len(self.seen)}"
        self.queue.append((rid, self.turns.pop(0)))
        return rid

    def step(self):
        out = []
        for rid, toks in self.queue:
            tok = toks.pop(0)
            out.append(TokenEvent(rid, tok, -1.0, [], "", "stop" if not toks else None))
        self.queue = [(rid, toks) for rid, toks in self.queue if toks]
        return out

    def abort(self, rid):
        return True


def test_multi_turn_rollout_masks_tool_tokens():
    env = builtin_env("arith_tools", TOK)
    t = R.start(env, name="arith_tools", group=0, seed=5, sample_seed=1)
    prompt = list(t.token_ids)
    answer = env._problem.columns["answer"]
    turn1 = [*TOK.encode(_call_text("1 + 1")), END]
    turn2 = [*TOK.encode(f"It is {answer}."), END]
    engine = ScriptedEngine([list(turn1), list(turn2)])
    stats = R.rollout(
        engine, [t], {id(t): env}, version=0, temperature=1.0, stop_token_ids=[END], max_response_tokens=lambda _: 500
    )
    tool_obs = t.token_ids[len(prompt) + len(turn1) : -len(turn2)]
    assert TOK.decode(tool_obs).startswith(f"{chat.IM_SYSTEM}calculator{chat.IM_MIDDLE}## Return of")
    assert t.token_ids == prompt + turn1 + tool_obs + turn2
    assert t.mask == [0] * len(prompt) + [1] * len(turn1) + [0] * len(tool_obs) + [1] * len(turn2)
    assert engine.seen == [prompt, prompt + turn1 + tool_obs]  # the second turn continues the exact ids
    assert t.reward == 1.0 and t.terminated and stats.generated_tokens == len(turn1) + len(turn2)
    assert [v for v, m in zip(t.versions, t.mask, strict=True) if m] == [0] * (len(turn1) + len(turn2))


class EchoTask:
    """A fixed prompt with no stop expected from a random model: long turns to pause."""

    name = "echo"

    def sample(self, rng):
        return Problem([{"role": "user", "content": f"say {rng.randint(0, 9)}"}], {"answer": "0"})


def _episodes(n: int) -> tuple[list[R.Trajectory], dict[int, ChatEnv]]:
    trajs, envs = [], {}
    for i in range(n):
        env = ChatEnv(EchoTask(), TOK, exact_answer_reward)
        t = R.start(env, name="echo", group=i // 2, seed=i // 2, sample_seed=R.derive_seed(7, i))
        trajs.append(t)
        envs[id(t)] = env
    return trajs, envs


def test_partial_rollout_continued_equals_uninterrupted_and_logprobs_match():
    model = _tiny()
    kw = dict(version=0, temperature=1.0, stop_token_ids=[END], max_response_tokens=lambda _: 24)

    whole, envs = _episodes(4)
    R.rollout(Engine(model, TOK, max_batch_size=4), whole, envs, **kw)

    parts, envs = _episodes(4)
    engine = Engine(model, TOK, max_batch_size=4)
    stats = R.rollout(engine, parts, envs, **kw, budget=30)
    assert stats.paused == 4 and 30 <= stats.generated_tokens < 34  # checked between engine steps (4 rows)
    buffer = R.ReplayBuffer(group_size=2, max_staleness=1)
    complete = buffer.split(parts)
    state = json.loads(json.dumps(buffer.state_dict()))  # what a checkpoint stores
    buffer = R.ReplayBuffer(group_size=2, max_staleness=1)
    buffer.load_state_dict(state)
    resumed, dropped = buffer.take(iteration=1)
    assert dropped == 0 and resumed
    envs = {}
    for t in resumed:  # fresh environments, as after a restart
        envs[id(t)] = ChatEnv(EchoTask(), TOK, exact_answer_reward)
        R.rebuild_env(envs[id(t)], t)
    R.rollout(Engine(model, TOK, max_batch_size=4), resumed, envs, **{**kw, "version": 1})
    done = {t.sample_seed: t for t in [*resumed, *(t for g in complete for t in g)]}
    for t in whole:
        u = done[t.sample_seed]
        assert u.token_ids == t.token_ids and u.mask == t.mask and u.done and u.reward == t.reward
        torch.testing.assert_close(torch.tensor(u.logprobs), torch.tensor(t.logprobs), rtol=0, atol=1e-4)
        assert set(u.versions) - {-1} <= {0, 1}

    # The trainer recomputes the log-probs of the same ids: equal to the engine's on the action tokens.
    for t in whole:
        ids = torch.tensor([t.token_ids])
        with torch.no_grad():
            mine = token_logprobs(model, ids)[0]
        mask = torch.tensor(t.mask, dtype=torch.bool)
        assert mask.sum() == 24 and not mask[: t.mask.index(1)].any()
        torch.testing.assert_close(mine[mask], torch.tensor(t.logprobs)[mask], rtol=0, atol=1e-4)


def test_stale_groups_are_dropped():
    trajs, _ = _episodes(4)
    for t, v in zip(trajs, (0, 0, 2, 3), strict=True):
        t.mask.append(1)
        t.versions.append(v)
    buffer = R.ReplayBuffer(group_size=2, max_staleness=1)
    buffer.trajectories = trajs
    kept, dropped = buffer.take(iteration=3)  # group 0 (version 0) is 3 iterations old; group 1 (2, 3) is fresh
    assert dropped == 2 and [t.group for t in kept] == [1, 1]
