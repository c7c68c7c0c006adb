"""``k2.parallel.activations`` (K2's selective recompute, FP8 activation storage and CPU offload) against the plain
model, and ``k2.parallel.activation_model`` against the bytes the hooks measure.

Oracles:
- recompute and offload change where saved tensors live, not the math: the loss, every gradient, the recorded max
  logits and expert loads are bit-identical to the plain model's (one backward, and two accumulated micro-batches);
- FP8 storage changes no forward value (the loss is bit-identical) and each parameter's gradient by at most 5 %
  (Frobenius, relative): E4M3 rounds each stored value by at most 2^-4 relative, ~2.6 % RMS, and the gradients of
  the gate/up weights are linear in those errors (measured: 2.6-3.8 % on ``tiny``);
- the saved bytes of one ``tiny`` MoE layer, counted tensor by tensor by hand below, and the activation model
  within 10 % of the measurement for ``tiny`` and ``small``.
"""

from __future__ import annotations

import pytest
import torch

from k2.model import Transformer
from k2.model.presets import small, tiny
from k2.ops import quantize_1x128
from k2.parallel.activation_model import layer_saved_bytes
from k2.parallel.activations import FP8, RECOMPUTE, ActivationMemory, apply_activation_memory, dequantize_1x128

K2_RECOMPUTE = ["norm", "swiglu", "mla_up_proj", "moe_down_proj"]
ALL_THREE = {"recompute": K2_RECOMPUTE, "fp8_activations": list(FP8), "offload": True}
B, S = 2, 48  # 96 tokens: 192 routed token copies, past Experts.FEW_ROWS


def _batch(config, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (B, S), generator=g), torch.randint(
        0, config.vocab_size, (B, S), generator=g
    )


def _step(options: dict | None, micro_batches: int = 1, config=None, dtype: torch.dtype = torch.float32):
    """Loss(es), gradients, max logits and expert loads of ``micro_batches`` accumulated backward passes."""
    config = config or tiny()
    torch.manual_seed(0)
    model = Transformer(config).to(dtype).train()
    if options is not None:
        apply_activation_memory(model, **options)
    losses = []
    for i in range(micro_batches):
        ids, labels = _batch(config, seed=1 + i)
        loss = model.loss(ids, labels)
        (loss / micro_batches).backward()
        losses.append(loss.detach())
    grads = {n: p.grad for n, p in model.named_parameters()}
    return torch.stack(losses), grads, model.max_attention_logits(), model.expert_load()


@pytest.fixture(scope="module")
def plain():
    return _step(None)


def _assert_identical(got, want) -> None:
    loss, grads, max_logits, load = got
    assert torch.equal(loss, want[0])
    assert grads.keys() == want[1].keys()
    for name, g in grads.items():
        assert torch.equal(g, want[1][name]), name
    assert torch.equal(max_logits, want[2]) and torch.equal(load, want[3])


@pytest.mark.parametrize(
    "options",
    [
        {},
        *({"recompute": [r]} for r in RECOMPUTE),
        {"offload": True},
        {"recompute": [*K2_RECOMPUTE, "attention"], "offload": True},
        {"recompute": list(RECOMPUTE), "offload": True},
    ],
    ids=lambda o: "+".join([*o.get("recompute", []), *(["offload"] if o.get("offload") else [])]) or "hooks-only",
)
def test_recompute_and_offload_are_bit_exact(options: dict, plain) -> None:
    _assert_identical(_step(options), plain)


def test_bf16_model_bit_exact() -> None:
    """bf16 weights and activations (RMSNorm and the router cast to fp32 inside, so more tensors are saved)."""
    want = _step(None, dtype=torch.bfloat16)
    _assert_identical(_step({"recompute": [*K2_RECOMPUTE, "attention"], "offload": True}, dtype=torch.bfloat16), want)
    _assert_identical(_step({"recompute": ["layer"]}, dtype=torch.bfloat16), want)


def test_offload_copies_on_cpu() -> None:
    """On the CPU offloading is a real copy: backward reads a separate buffer, not the forward's tensor."""
    mem = ActivationMemory(offload=True)
    x = torch.randn(4, 8, requires_grad=True)
    with mem.measure() as stats, mem.layer_scope(0):
        y = x.exp()  # saves its output
    assert (stats[0].offloaded, stats[0].device) == (y.numel() * 4, 0)
    unpacked = y.grad_fn._saved_result
    assert torch.equal(unpacked, y) and unpacked.data_ptr() != y.data_ptr()
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())


@pytest.mark.parametrize("fp8", [[f] for f in FP8] + [list(FP8)], ids="+".join)
def test_fp8_storage_within_bound(fp8: list[str], plain) -> None:
    loss, grads, max_logits, _ = _step({"fp8_activations": fp8})
    assert torch.equal(loss, plain[0]) and torch.equal(max_logits, plain[2])  # storage only: the forward is unchanged
    errors = {n: ((g - plain[1][n]).norm() / plain[1][n].norm()).item() for n, g in grads.items()}
    assert max(errors.values()) <= 0.05, max(errors.items(), key=lambda kv: kv[1])
    assert max(errors.values()) > 0  # the stored values really were FP8


def test_all_three_with_gradient_accumulation() -> None:
    """K2's combination over two accumulated micro-batches: recompute + offload alone bit-exact, with FP8 within
    the bound, against the plain model accumulating the same micro-batches."""
    want = _step(None, micro_batches=2)
    _assert_identical(_step({"recompute": K2_RECOMPUTE, "offload": True}, micro_batches=2), want)
    loss, grads, _, _ = _step(ALL_THREE, micro_batches=2)
    assert torch.equal(loss, want[0])
    assert max(((g - want[1][n]).norm() / want[1][n].norm()).item() for n, g in grads.items()) <= 0.05


def test_dequantize_1x128_inverts_the_cast() -> None:
    x = torch.randn(5, 300)  # a partial last tile
    q, scale = quantize_1x128(x)
    y = dequantize_1x128(q, scale, torch.float32)
    assert y.is_contiguous() and y.shape == x.shape
    torch.testing.assert_close(y, x, rtol=2**-4, atol=float(scale.max()) * 2**-9)


def _measure(config, options: dict, tokens: tuple[int, int] = (B, S)):
    torch.manual_seed(0)
    model = Transformer(config).train()
    mem = apply_activation_memory(model, **options)
    ids = torch.randint(0, config.vocab_size, tokens, generator=torch.Generator().manual_seed(1))
    with mem.measure() as stats:
        model.loss(ids, ids)
    return stats


def test_saved_bytes_of_one_tiny_moe_layer_by_hand() -> None:
    """tiny's layer 1 (MoE) in fp32 over 96 tokens, each saved tensor counted per token (4 bytes a value)."""
    d, h, dn, dr, dv, qr, r, f, k, e = 128, 4, 32, 16, 32, 64, 32, 96, 2, 8  # tiny()
    norm = lambda n: 4 * n + 4 + 4 * n  # noqa: E731  fp32 input (x.float() is x), rsqrt, normalised value
    attention = (
        norm(d)  # input_layernorm
        + 4 * d  # its output, the input of q_a_proj and kv_a_proj
        + norm(qr)  # q_a_layernorm
        + 4 * qr  # q_b_proj's input
        + 4 * dr  # RoPE cos and sin, dr/2 each
        + norm(r)
        + 4 * dr  # kv_a_layernorm: its input is a view of kv_a's [r + dr] output
        + 4 * r  # kv_b_proj's input
        + 2 * 4 * h * (dn + dr)  # attention's q and k
        + 4 * h * (dn + dv)  # kv_b_proj's output (attention's v is a view of it)
        + 4 * h * dv
        + 4 * h  # o (also o_proj's input) and the log-sum-exp
    )
    ffn = (
        norm(d)  # post_attention_layernorm
        + 4 * d  # its output: router (fp32 already) and shared expert input
        + 4 * e
        + 8 * k
        + 4
        + 3 * 4 * k  # scores, top-k ids, normaliser, weights, scaled weights, row map (int32)
        + k * 4 * (d + 4 * f + d)  # routed copies: x_sorted, gate, up, silu(gate), product, y_sorted
        + 4 * 4 * f  # the shared expert: gate, up, silu(gate), product
    )
    tokens = B * S
    per_batch = 4 * (e + B + 1)  # expert offsets and cu_seqlens (int32)
    plain = _measure(tiny(), {})[1]
    assert (plain.device, plain.offloaded) == ((attention + ffn) * tokens + per_batch, 0)

    # K2's three: recompute drops norms' internals and outputs, silu(gate), the product, attention's q, k, v (kept:
    # the rotated q_rope [H, dr] and k_rope [dr]) and y_sorted; FP8 keeps x_sorted, gate and up as E4M3 + one fp32
    # scale per 128 values; everything else is offloaded.
    fp8 = lambda n: n + 4 * -(-n // 128)  # noqa: E731
    device = k * fp8(d) + 2 * k * fp8(f) + 2 * fp8(f)
    offloaded = (
        4 * d  # block input (input_layernorm's region input)
        + 4 * qr  # q_a_proj's output (q_a_layernorm's input)
        + 4 * dr  # cos, sin
        + 4 * (r + dr)  # kv_a's output
        + 4 * h * dr
        + 4 * dr  # q_rope, k_rope
        + 4 * h * dv
        + 4 * h  # o, log-sum-exp
        + 4 * d  # post-attention residual
        + 4 * e
        + 8 * k
        + 4
        + 3 * 4 * k  # router
    ) * tokens + per_batch
    combined = _measure(tiny(), ALL_THREE)[1]
    assert (combined.device, combined.offloaded) == (device * tokens, offloaded)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_activation_model_matches_measurement(preset: str) -> None:
    config = tiny() if preset == "tiny" else small().replace(num_hidden_layers=2)
    cases = [{}, *({"recompute": [r]} for r in RECOMPUTE), *({"fp8_activations": [f]} for f in FP8), ALL_THREE]
    for options in cases:
        stats = _measure(config, options, tokens=(1, 64))
        for layer in (0, 1):  # dense, MoE
            want = layer_saved_bytes(config, layer, act_bytes=4, **options)
            got = stats[layer]
            for measured, predicted in ((got.device, want.device), (got.offloaded, want.offloaded)):
                assert measured / 64 == pytest.approx(predicted, rel=0.1, abs=1.0), (options, layer)


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown option"):
        apply_activation_memory(Transformer(tiny()), recompute=["layernorm"])
    model = Transformer(tiny())
    apply_activation_memory(model)
    with pytest.raises(ValueError, match="already applied"):
        apply_activation_memory(model)
