"""``k2.rl.k15_loss`` against hand-computed values and the direct formula, its on-policy gradient against
REINFORCE with a mean baseline, the length penalty, and per-token log-probs against an explicit loop."""

from __future__ import annotations

import pytest
import torch

from k2.model import Transformer, presets
from k2.rl.loss import k15_loss, length_penalty, ptx_loss, sequence_logprobs, token_logprobs


def direct_k15(logp, logp_old, rewards, k: int, tau: float) -> torch.Tensor:
    """The formula as written, one prompt and one sample at a time."""
    n = len(rewards)
    per_prompt = []
    for p in range(n // k):
        group = range(p * k, (p + 1) * k)
        mean_r = sum(rewards[i] for i in group) / k
        per_prompt.append(sum((rewards[i] - mean_r - tau * (logp[i] - logp_old[i])) ** 2 for i in group) / k)
    return sum(per_prompt) / len(per_prompt)


def test_hand_computed_value():
    # Prompt 0: rewards (1, 0), mean 0.5; log-ratios (0.2, -0.4); tau 0.5:
    #   residuals 0.5 - 0.1 = 0.4 and -0.5 + 0.2 = -0.3 -> (0.16 + 0.09) / 2 = 0.125
    # Prompt 1: rewards (1, 1), mean 1; log-ratios (1.0, 0.0): residuals -0.5, 0 -> 0.25 / 2 = 0.125
    logp = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    logp_old = torch.tensor([-1.2, -1.6, -4.0, -4.0])
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    loss = k15_loss(logp, logp_old, rewards, group_size=2, tau=0.5)
    torch.testing.assert_close(loss, torch.tensor(0.125), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("n", "k"), [(1, 1), (6, 3), (8, 8), (12, 4)])
def test_value_and_gradient_match_direct_formula(n, k):
    g = torch.Generator().manual_seed(n * 10 + k)
    logp = torch.randn(n, generator=g, dtype=torch.float64) * 3 - 10
    logp_old = (logp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).detach()
    rewards = torch.randint(0, 2, (n,), generator=g).double()
    tau = 0.3
    a = logp.clone().requires_grad_()
    b = logp.clone().requires_grad_()
    loss = k15_loss(a, logp_old, rewards, k, tau)
    ref = direct_k15(b, logp_old, rewards, k, tau)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_on_policy_gradient_is_reinforce_with_mean_baseline():
    """At π_θ = π_old the K1.5 gradient is −2τ · (1/N) Σ (r_i − r̄) ∇log π(y_i): REINFORCE, group-mean baseline."""
    torch.manual_seed(0)
    p, k, steps, vocab = 3, 4, 5, 7
    theta = torch.randn(steps, vocab, dtype=torch.float64, requires_grad=True)  # a per-position categorical policy
    actions = torch.randint(0, vocab, (p * k, steps))
    rewards = torch.rand(p * k, dtype=torch.float64)
    tau = 0.7

    def seq_logp():
        return torch.log_softmax(theta, dim=-1).gather(1, actions.T).T.sum(dim=1)  # [N]

    logp = seq_logp()
    k15_loss(logp, logp.detach(), rewards, k, tau).backward()
    grad_k15 = theta.grad.clone()

    theta.grad = None
    advantage = (rewards.view(p, k) - rewards.view(p, k).mean(dim=1, keepdim=True)).view(-1)
    (advantage * seq_logp()).mean().backward()  # the REINFORCE surrogate: its gradient is the direction
    torch.testing.assert_close(grad_k15, -2 * tau * theta.grad, rtol=1e-10, atol=1e-12)


def test_equal_rewards_on_policy_give_zero_loss_and_gradient():
    logp = torch.tensor([-3.0, -5.0, -1.0], requires_grad=True)
    loss = k15_loss(logp, logp.detach(), torch.ones(3), 3, 0.1)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(logp.grad) == 0


def test_bad_arguments():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="multiple of group_size"):
        k15_loss(x, x, x, 3, 0.1)
    with pytest.raises(ValueError, match="tau"):
        k15_loss(x, x, x, 2, 0.0)
    with pytest.raises(ValueError, match="one shape"):
        k15_loss(x, x[:3], x, 1, 0.1)


def test_length_penalty_hand_values():
    # group 0: lengths 10, 20, 30 -> λ = 0.5, 0, -0.5; correct, incorrect, correct -> 0.5, 0, -0.5
    # group 1: all lengths equal -> 0; group 2: lengths 4, 8, 6, incorrect, incorrect, correct -> 0 (min(0, .5)),
    #   -0.5, 0
    lengths = torch.tensor([10, 20, 30, 5, 5, 5, 4, 8, 6])
    correct = torch.tensor([1, 0, 1, 1, 0, 1, 0, 0, 1])
    out = length_penalty(lengths, correct, 3)
    torch.testing.assert_close(out, torch.tensor([0.5, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0, -0.5, 0.0]))


def test_token_logprobs_match_a_loop_and_ptx_is_the_lm_loss():
    torch.manual_seed(0)
    model = Transformer(presets.get("tiny").replace(num_hidden_layers=1, vocab_size=64)).eval()
    ids = torch.randint(0, 64, (2, 9))
    out = token_logprobs(model, ids)
    for b in range(2):
        for s in range(1, 9):
            ref = torch.log_softmax(model(ids[b : b + 1, :s]).float()[0, -1], -1)[ids[b, s]]
            torch.testing.assert_close(out[b, s], ref, rtol=1e-5, atol=1e-5)
    assert torch.all(out[:, 0] == 0)
    mask = torch.zeros(2, 9)
    mask[:, 5:] = 1
    torch.testing.assert_close(sequence_logprobs(out, mask), out[:, 5:].sum(1))
    labels = ids[:, 1:].clone()
    labels[:, :3] = -100
    ce = -(out[:, 4:]).mean()
    torch.testing.assert_close(ptx_loss(model, ids[:, :-1], labels), ce, rtol=1e-5, atol=1e-5)
