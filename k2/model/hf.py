"""Hugging Face checkpoints (DeepSeek-V3 / Kimi-K2 / Moonlight format) ⇄ ``k2.model.Transformer``.

Format (the released Kimi-K2 / DeepSeek-V3 checkpoints): ``config.json`` plus safetensors shards with
``model.safetensors.index.json``; tensors named ``model.layers.N.self_attn.q_a_proj.weight`` ...,
``lm_head.weight``, routed experts one tensor per expert (``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight``),
which k2 stacks into ``w_gate/w_up [E, F, D]`` and ``w_down [E, D, F]``. FP8 checkpoints store E4M3 weights with a
``<name>_scale_inv`` fp32 sibling per 128×128 block (multiplicative, despite the name); DeepSeek-V3 leaves
embeddings, LM head, norms and the router in bf16/fp32, and so does :func:`save_hf`.

Loading builds the model on the meta device, allocates it once at the target dtype and copies tensors in shard
by shard, so peak memory is about the model plus one shard. Layers past ``num_hidden_layers`` (DeepSeek-V3's
multi-token-prediction layer 61) are skipped, as transformers does. Everything else that does not match (missing,
unexpected, wrong shape) is reported in one ``CheckpointError``. Saving writes into a temporary directory next
to the target and renames it into place.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from k2.errors import CheckpointError
from k2.model.config import ModelConfig
from k2.model.transformer import Transformer

INDEX_FILE = "model.safetensors.index.json"
_EXPERT_NAMES = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# config.json keys that describe a file rather than the architecture; save_hf rewrites or drops them.
_FILE_KEYS = ("quantization_config", "torch_dtype", "dtype", "transformers_version", "auto_map", "_name_or_path")
_DERIVED_KEYS = ("qk_head_dim", "head_dim", "rope_parameters")
_FP8_BLOCK = 128


# ---- names -------------------------------------------------------------------------------------------------


def _hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def hf_tensor_names(model: Transformer) -> dict[str, tuple[str, int | None]]:
    """Every checkpoint tensor name of ``model`` → (k2 state-dict name, expert index or None)."""
    names: dict[str, tuple[str, int | None]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        prefix, _, leaf = name.rpartition(".")
        if leaf in _EXPERT_NAMES and prefix.endswith("mlp.experts"):
            for e in range(tensor.shape[0]):
                names[f"{_hf_name(prefix)}.{e}.{_EXPERT_NAMES[leaf]}.weight"] = (name, e)
        else:
            names[_hf_name(name)] = (name, None)
    return names


def _quantized(hf_name: str, tensor: torch.Tensor) -> bool:
    """Whether save_hf(fp8=True) stores this tensor in FP8 (DeepSeek-V3's choice: linear layers only)."""
    return (
        tensor.dim() == 2
        and hf_name.endswith("_proj.weight")
        and hf_name != "lm_head.weight"
        and ".mlp.gate." not in hf_name
    )


# ---- config ------------------------------------------------------------------------------------------------


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ``ModelConfig`` of the checkpoint directory ``path`` (its ``config.json``)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"load_hf: {file} not found (expected a Hugging Face checkpoint directory)")
    try:
        return ModelConfig.from_dict(json.loads(file.read_text()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"load_hf: {file}: {e}") from e


def hf_config_dict(config: ModelConfig, *, dtype: torch.dtype, fp8: bool) -> dict:
    """``config.json`` contents for ``config``: DeepSeek-V3 keys, RoPE both as ``rope_theta`` + ``rope_scaling``
    (DeepSeek / vLLM / SGLang) and as ``rope_parameters`` (transformers 5)."""
    d = {k: v for k, v in config.extra.items() if k not in _FILE_KEYS + _DERIVED_KEYS}
    fields = config.to_dict()
    fields.pop("extra")
    fields.pop("initializer_range")
    d.update(fields)
    d.update(
        architectures=["DeepseekV3ForCausalLM"],
        model_type="deepseek_v3",  # what transformers and vLLM map natively (Kimi-K2's own "kimi_k2" needs remote code)
        num_key_value_heads=config.num_attention_heads,
        hidden_act="silu",
        attention_bias=False,
        tie_word_embeddings=False,
        moe_layer_freq=1,
        num_nextn_predict_layers=0,
        rope_interleave=True,
        topk_method="noaux_tc" if config.scoring_func == "sigmoid" else "greedy",
        seq_aux=True,
        initializer_range=config.initializer_range,
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rs = dict(config.rope_scaling)
        rope = {"rope_type": rs.pop("type"), "rope_theta": config.rope_theta, **rs}
    d["rope_parameters"] = rope
    if fp8:
        d["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [_FP8_BLOCK, _FP8_BLOCK],
        }
    return dict(sorted(d.items()))


# ---- load --------------------------------------------------------------------------------------------------


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name → shard file."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"load_hf: no *.safetensors files in {path}")
    out = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), file))
    return out


def _dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from k2.ops import dequantize_128x128  # the FP8 family; imported only for FP8 checkpoints

    if dtype in (torch.float32, torch.bfloat16, torch.float16):
        return dequantize_128x128(weight, scale_inv, out_dtype=dtype)
    return dequantize_128x128(weight, scale_inv, out_dtype=torch.float32).to(dtype)


def _materialize(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> Transformer:
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype).to_empty(device=device)
    model.reset_max_attention_logits()
    for moe in model.moe_layers():
        moe.tokens_per_expert.zero_()
    return model


def load_hf(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Transformer:
    """Load a DeepSeek-V3 / Kimi-K2 / Moonlight checkpoint directory into a ``Transformer`` (eval mode).

    ``dtype`` defaults to the checkpoint's ``torch_dtype`` (fp32 if absent); FP8 weights are dequantised to it.
    The router's correction bias stays fp32.
    """
    path = Path(path)
    config = read_config(path)
    if dtype is None:
        name = config.extra.get("torch_dtype") or config.extra.get("dtype") or "float32"
        dtype = getattr(torch, str(name))
    model = _materialize(config, dtype, torch.device(device))
    expected = hf_tensor_names(model)
    state = model.state_dict(keep_vars=True)
    files = _weight_files(path)
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)

    loaded: set[str] = set()
    unexpected: list[str] = []
    misshaped: dict[str, str] = {}
    for file in sorted(by_file):
        with safe_open(file, framework="pt") as f:
            for name in by_file[file]:
                if name.endswith("_scale_inv"):
                    if name.removesuffix("_scale_inv") not in files:
                        unexpected.append(name)
                    continue
                if name not in expected:
                    layer = _LAYER_RE.match(name)
                    if not (layer and int(layer.group(1)) >= config.num_hidden_layers) and "rotary_emb" not in name:
                        unexpected.append(name)
                    continue
                k2_name, expert = expected[name]
                target = state[k2_name] if expert is None else state[k2_name][expert]
                tensor = f.get_tensor(name)
                if tensor.dtype == torch.float8_e4m3fn:
                    scale_name = f"{name}_scale_inv"
                    if scale_name not in files:
                        misshaped[name] = f"{name}: FP8 tensor without {scale_name}"
                        continue
                    with safe_open(files[scale_name], framework="pt") as sf:
                        tensor = _dequantize(tensor, sf.get_tensor(scale_name), target.dtype)
                if tuple(tensor.shape) != tuple(target.shape):
                    misshaped[name] = f"{name}: checkpoint {tuple(tensor.shape)}, model {tuple(target.shape)}"
                    continue
                with torch.no_grad():
                    target.copy_(tensor)
                loaded.add(name)
    missing = [name for name in expected if name not in loaded and name not in misshaped]
    if missing or unexpected or misshaped:
        raise CheckpointError(
            f"load_hf: {path} does not match the model its config.json describes: "
            + "; ".join(
                f"{what} ({len(names)}): {_summary(names)}"
                for what, names in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("mis-shaped", list(misshaped.values())),
                )
                if names
            )
        )
    return model.eval()


def _summary(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... and {len(names) - limit} more"


# ---- save --------------------------------------------------------------------------------------------------


def _quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from k2.ops import quantize_128x128  # the FP8 family; imported only for FP8 saves

    return quantize_128x128(weight)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"save_hf: max_shard_size must be bytes or like '5GB', got {size!r}")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


def _tensors(model: Transformer, dtype: torch.dtype, fp8: bool) -> Iterator[tuple[str, int, tuple]]:
    """(name, bytes, (storage dtype or "fp8", source view)) for every tensor to write, in state-dict order; the
    stored tensors are built shard by shard, so only one shard is materialised at a time."""
    state = model.state_dict()
    for name, (k2_name, expert) in hf_tensor_names(model).items():
        source = state[k2_name] if expert is None else state[k2_name][expert]
        out_dtype = torch.float32 if name.endswith("e_score_correction_bias") else dtype
        if fp8 and _quantized(name, source):
            rows, cols = source.shape
            scale_shape = [math.ceil(rows / _FP8_BLOCK), math.ceil(cols / _FP8_BLOCK)]
            yield name, source.numel() + 4 * math.prod(scale_shape), ("fp8", source)
        else:
            yield name, source.numel() * out_dtype.itemsize, (out_dtype, source)


def save_hf(
    model: Transformer,
    path: str | os.PathLike,
    *,
    fp8: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write ``model`` as a Hugging Face checkpoint directory (config.json, shards, index), atomically.

    ``dtype``: storage dtype of the unquantised tensors; by default the model's own parameter dtype (as
    transformers' ``save_pretrained``), so a save and reload gives the same logits. ``torch.bfloat16`` (the
    released checkpoints' choice) and ``fp8=True`` (linear-layer weights as E4M3 with 128×128
    ``weight_scale_inv`` blocks) are explicit, lossy choices.
    An existing directory at ``path`` is replaced only once the new one is complete.
    """
    path = Path(path)
    if dtype is None:
        dtype = next(model.parameters()).dtype
    limit = _parse_size(max_shard_size)
    shards: list[list[tuple[str, object]]] = [[]]
    size, total = 0, 0
    for name, nbytes, producer in _tensors(model, dtype, fp8):
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, producer))
        size += nbytes
        total += nbytes

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors: dict[str, torch.Tensor] = {}
            for name, (kind, source) in shard:
                source = source.detach().cpu()
                if kind == "fp8":
                    q, scale_inv = _quantize(source)
                    tensors[name], tensors[f"{name}_scale_inv"] = q.contiguous(), scale_inv.float().contiguous()
                    weight_map[f"{name}_scale_inv"] = file
                else:
                    tensors[name] = source.to(kind).clone()
                weight_map[name] = file
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        config = hf_config_dict(model.config, dtype=dtype, fp8=fp8)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished directory ``new`` to ``target``; an old ``target`` is removed only after the swap."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
