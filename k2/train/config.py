"""``TrainConfig`` (``k2 pretrain``) and ``SFTConfig`` (``k2 sft``): everything a run needs, as frozen keyword-only
dataclasses, one per TOML section. The two share ``[optim]``, ``[train]``, ``[checkpoint]`` and ``[parallel]`` (with
different defaults: ``SFTConfig``'s are those of the embedded SFT default) and have their own ``[model]``, ``[data]``
and ``[eval]``.

Sources, each overriding the one before: the config class's defaults → an optimizer recipe (``optim.recipe =
"kimi_k2"`` sets the report's lr, schedule and weight decay) → a TOML file (``--config``) → ``--set
section.key=value`` overrides. Every key is checked: an unknown section or key, or a value of the wrong type,
raises ``ConfigError`` naming it and listing what is allowed. The resolved config is written into the run
directory as ``config.toml`` and is what ``--resume`` reads back.

``[parallel]`` (``dp``, ``ep``, ``pp`` and the pipeline's ``pp_*``, ``timeout_s``) lays the run out over the ranks of a
torchrun job (``k2.parallel``); all 1s is one process. ``train.batch_size`` is the global batch over all dp ranks, so
changing dp or pp does not change the math (with pp > 1 each pipeline splits its rows into ``pp_microbatches``).
``validate_parallel`` holds every rule of the section.

``[model]`` holds ``preset`` plus any scalar ``ModelConfig`` field, which overrides the preset's value (e.g.
``num_hidden_layers = 2``). TOML has no null, so "off" is spelled 0 where a feature can be off (``grad_clip``,
``qk_clip_tau``, ``checkpoint_every``) and ``data.path = ""`` means the built-in corpus.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from k2.errors import ConfigError
from k2.model import ModelConfig, presets
from k2.optim import schedule
from k2.parallel.plan import check_pipeline

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_FILE = "config.toml"


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields that replace the preset's

    def build(self) -> ModelConfig:
        """The preset with the overrides applied (``ConfigError`` for an unknown preset or an invalid result)."""
        return presets.get(self.preset).replace(**self.overrides)


@dataclass(frozen=True, kw_only=True)
class DataSection:
    path: str = ""  # a .txt/.jsonl/.parquet file or a directory of them; "" = the built-in synthetic corpus
    text_field: str = "text"  # .jsonl key / .parquet column
    txt_split: Literal["file", "paragraph", "line"] = "file"
    tokenizer: str = "byte"  # "byte" (built-in, vocab 512) or a tokenizer directory / tiktoken.model file
    context_len: int = 256
    document_mask: bool = False  # attention stays within each document of a packed row; positions restart per document
    corpus_documents: int = 6000  # size of the built-in corpus
    corpus_seed: int = 0
    heldout_fraction: float = 0.03  # documents held out for evaluation (by a hash of their text)
    seed: int = 0  # order of the training sequences


@dataclass(frozen=True, kw_only=True)
class OptimSection:
    recipe: Literal["", "kimi_k2"] = ""  # "kimi_k2": the report's lr, schedule and weight decay as defaults
    name: Literal["muonclip", "adamw"] = "muonclip"
    lr: float = 1e-2  # peak learning rate (MuonClip matches AdamW's update RMS, so one lr serves both halves)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW (and MuonClip's AdamW half)
    eps: float = 1e-8
    momentum: float = 0.95  # Muon (Nesterov)
    qk_clip_tau: float = 100.0  # QK-Clip threshold τ; 0 = off
    warmup_steps: int = 15
    decay: Literal["cosine", "linear"] = "cosine"
    decay_fraction: float = 0.3  # share of train.steps spent decaying
    min_lr_ratio: float = 0.1  # the decay ends at min_lr_ratio · lr
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    expert_bias_rate: float = 1e-3  # aux-loss-free balancing step (DeepSeek-V3's γ); 0 = off


@dataclass(frozen=True, kw_only=True)
class TrainSection:
    steps: int = 300  # optimizer steps
    batch_size: int = 8  # GLOBAL sequences per micro-batch, over all data-parallel ranks (parallel.dp divides it)
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0  # model initialisation
    device: str = "auto"  # "auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on a bf16 GPU, fp32 on CPU
    max_skipped_steps: int = 5  # consecutive non-finite steps that stop the run
    log_every: int = 25  # progress lines when stderr is not a terminal
    checkpoint_every: int = 50  # steps between checkpoints (and one at the end); 0 = only at the end
    threads: int = 1  # torch CPU threads, 0 = all cores; 1 is the robust choice for tiny on a shared CPU (README)
    # Activation memory (k2.parallel.activations; K2 report §2.4): operations recomputed in backward, activations kept
    # as FP8 (E4M3, 1x128 tiles) for backward, and every other saved activation offloaded to host memory.
    recompute: tuple[Literal["norm", "swiglu", "mla_up_proj", "moe_down_proj", "attention", "layer"], ...] = ()
    fp8_activations: tuple[Literal["moe_up_proj_input", "swiglu_input"], ...] = ()
    offload_activations: bool = False


@dataclass(frozen=True, kw_only=True)
class EvalSection:
    every: int = 50  # steps between held-out evaluations (and one at the end); 0 = only at the end
    batch_size: int = 16
    max_sequences: int = 128  # held-out sequences per evaluation; 0 = all


@dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    keep_last: int = 2  # training checkpoints kept in RUN_DIR/checkpoints
    export_hf: bool = True  # write RUN_DIR/hf (safetensors + config.json + tokenizer) at the end
    hf_dtype: Literal["bfloat16", "float32"] = "bfloat16"


@dataclass(frozen=True, kw_only=True)
class ParallelSection:
    dp: int = 1  # data-parallel ranks (ZeRO-1); pp·dp = WORLD_SIZE of the torchrun job
    ep: int = 1  # expert-parallel ranks, drawn from dp: ep divides dp and model.n_routed_experts
    pp: int = 1  # pipeline-parallel ranks (k2.parallel.pipeline); pp > 1 needs train.grad_accum = 1
    # Stages per pipeline rank: 2 by default, the fewest that make the default interleaved 1F1B interleave (with 1 it
    # is plain 1F1B) and what K2 trained with; pp x pp_virtual_stages <= the model's layers; 1 for 1f1b and gpipe.
    pp_virtual_stages: int = 2
    pp_schedule: Literal["interleaved_1f1b", "interleaved_zero_bubble", "looped_bfs", "1f1b", "gpipe"] = (
        "interleaved_1f1b"
    )
    pp_microbatches: int = 0  # micro-batches per step and pipeline; 0 = pp, the fewest interleaved 1F1B takes
    pp_layers: tuple[int, ...] = ()  # decoder layers per stage (pp x pp_virtual_stages counts); () = balanced
    timeout_s: float = 600.0  # torch.distributed collective timeout: a dead rank ends the job after this long

    @property
    def microbatches(self) -> int:
        """``pp_microbatches`` resolved (0 means ``pp``)."""
        return self.pp_microbatches or self.pp


class _RunConfig:
    """What every run config (``TrainConfig``, ``SFTConfig``) does: its TOML layout and the saved file."""

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The TOML layout: model overrides are flattened into ``[model]`` next to ``preset``."""
        out = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        model = self.model  # type: ignore[attr-defined]
        if isinstance(model, ModelSection):
            out["model"] = {"preset": model.preset, **model.overrides}
        out["optim"]["betas"] = list(self.optim.betas)  # type: ignore[attr-defined]
        return out

    def save(self, run_dir: str | os.PathLike[str]) -> Path:
        """Write ``RUN_DIR/config.toml`` atomically; returns its path."""
        path = Path(run_dir) / CONFIG_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(tomli_w.dumps(self.to_dict()).encode())
        os.replace(tmp, path)
        return path


@dataclass(frozen=True, kw_only=True)
class TrainConfig(_RunConfig):
    """A pre-training run (``k2 pretrain``)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)


# ---- supervised fine-tuning (k2 sft) ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SFTModelSection:
    # A Hugging Face-format checkpoint directory (config.json, safetensors, tokenizer); "" = the export (hf/) of the
    # latest k2 pretrain run in runs/. The run's config.toml records the directory it resolved to.
    path: str = ""


@dataclass(frozen=True, kw_only=True)
class SFTDataSection:
    path: str = ""  # .jsonl / .parquet chat records, or a directory of them; "" = the built-in tool-use dialogues
    # Tokens per row. A conversation may have up to min(context_len, the model's max_position_embeddings) positions;
    # a longer one is skipped and counted, or an error (too_long).
    context_len: int = 2048
    pack: bool = True  # several conversations per row, attention masked per conversation; false: one per row, padded
    too_long: Literal["skip", "error"] = "skip"
    heldout_fraction: float = 0.04  # conversations held out (by a hash of the record) for evaluation
    generated: int = 23000  # built-in dialogues (path = ""): ~3,000 with tools, ~20,000 short mental arithmetic
    generator_seed: int = 0
    seed: int = 0  # order of the training rows


@dataclass(frozen=True, kw_only=True)
class SFTEvalSection:
    every: int = 40  # steps between held-out evaluations (and one at the end); 0 = only at the end
    batch_size: int = 8
    max_sequences: int = 64  # held-out rows whose loss is measured; 0 = all
    tool_turns: int = 48  # held-out assistant turns that call tools, generated and scored; 0 = no tool metrics
    max_new_tokens: int = 128  # generation limit per scored turn (two parallel built-in calls take ~100)
    at_start: bool = True  # also evaluate the starting checkpoint (step 0): the "before" numbers


@dataclass(frozen=True, kw_only=True)
class SFTConfig(_RunConfig):
    """A supervised fine-tuning run (``k2 sft``); ``[model]`` names the checkpoint, whose config.json is the model."""

    model: SFTModelSection = field(default_factory=SFTModelSection)
    data: SFTDataSection = field(default_factory=SFTDataSection)
    optim: OptimSection = field(
        default_factory=lambda: OptimSection(lr=6e-3, warmup_steps=10, decay_fraction=0.4, weight_decay=0.0)
    )
    # batch_size counts rows: 3 packed rows of 2048 tokens; 300 steps see the built-in dialogues about once
    train: TrainSection = field(
        default_factory=lambda: TrainSection(steps=300, batch_size=3, log_every=20, checkpoint_every=100)
    )
    eval: SFTEvalSection = field(default_factory=SFTEvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)


RunConfig = TrainConfig | SFTConfig

# Recipes are defaults for the optim section; explicit values in a file or --set still win.
RECIPES: dict[str, dict[str, Any]] = {
    "": {},
    "kimi_k2": {
        "name": "muonclip",
        "lr": schedule.KIMI_K2_PEAK_LR,
        "weight_decay": schedule.KIMI_K2_WEIGHT_DECAY,
        "warmup_steps": schedule.KIMI_K2_WARMUP_STEPS,
        "decay": "cosine",
        "decay_fraction": schedule.KIMI_K2_DECAY_FRACTION,
        "min_lr_ratio": schedule.KIMI_K2_MIN_LR / schedule.KIMI_K2_PEAK_LR,
        "qk_clip_tau": 100.0,
    },
}


# ---- type checking ------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return "a list of " + ", ".join(_type_name(a) for a in args)
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "none"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


_ACCEPTS: dict[type, type | tuple[type, ...]] = {bool: bool, int: int, float: (int, float), str: str}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (ints widen to floats); ``ConfigError`` naming ``key`` if it does not fit."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is not type(None):
                try:
                    return _coerce(value, arg, key)
                except ConfigError:
                    pass
    elif origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis and isinstance(value, list | tuple):  # tuple[X, ...]: any length
            return tuple(_coerce(v, args[0], key) for v in value)
        if isinstance(value, list | tuple) and len(value) == len(args):
            return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    elif tp in _ACCEPTS and isinstance(value, _ACCEPTS[tp]) and isinstance(value, bool) == (tp is bool):
        return float(value) if tp is float else value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _model_field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(ModelConfig)
    scalar = (int, float, str, bool)
    out = {}
    for f in dataclasses.fields(ModelConfig):
        tp = hints[f.name]
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if all(a in scalar or a is type(None) for a in args):
            out[f.name] = tp
    return out


def _parse_override(item: str) -> tuple[str, str, Any]:
    """``"section.key=value"`` → (section, key, value); the value is read as a TOML value, else as a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    dotted, raw = item.split("=", 1)
    section, _, key = dotted.strip().partition(".")
    if not section or not key or "." in key:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.steps=100")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: TOML syntax error: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a UTF-8 text file") from None


def _check_section(name: str, values: Any, origin: str, sections: dict[str, Any]) -> None:
    if name not in sections:
        raise ConfigError(f"{origin}: unknown section [{name}]; sections are {', '.join(sections)}")
    if not isinstance(values, dict):
        raise ConfigError(f"{origin}: [{name}] must be a table of key = value")


def build_config(
    *,
    file: str | os.PathLike[str] | None = None,
    data: dict[str, dict[str, Any]] | None = None,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    schema: type[RunConfig] = TrainConfig,
) -> RunConfig:
    """Resolve a ``TrainConfig`` (or another ``schema``: ``SFTConfig``) from an optional TOML ``file`` (or an
    already-parsed ``data`` dict), an optional model ``preset`` and ``--set`` style ``overrides`` (later wins) over
    the schema's defaults. Raises ``ConfigError`` on any unknown key, wrong type or invalid value."""
    defaults = schema()
    sections_of = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)}
    layers: list[tuple[str, dict[str, dict[str, Any]]]] = []
    if file is not None:
        layers.append((str(file), _read_toml(file)))
    if data is not None:
        layers.append(("config", data))
    if preset is not None:
        layers.append(("--preset", {"model": {"preset": preset}}))
    for item in overrides:
        section, key, value = _parse_override(item)
        layers.append((f"--set {item}", {section: {key: value}}))

    merged: dict[str, dict[str, Any]] = {name: {} for name in sections_of}
    for origin, layer in layers:
        for name, values in layer.items():
            _check_section(name, values, origin, sections_of)
            merged[name].update(values)

    recipe = merged["optim"].get("recipe", "")
    if recipe not in RECIPES:
        raise ConfigError(f"optim.recipe: unknown recipe {recipe!r}; known: {', '.join(repr(r) for r in RECIPES)}")
    merged["optim"] = {**RECIPES[recipe], **merged["optim"]}

    sections: dict[str, Any] = {}
    model_types = _model_field_types()
    for name, default in sections_of.items():
        values, cls = merged[name], type(default)
        if cls is ModelSection:
            preset_name = _coerce(values.pop("preset", "tiny"), str, "model.preset")
            unknown = [k for k in values if k not in model_types]
            if unknown:
                raise ConfigError(
                    f"unknown key model.{unknown[0]}; [model] takes preset and the ModelConfig fields "
                    f"{', '.join(model_types)}"
                )
            coerced = {k: _coerce(v, model_types[k], f"model.{k}") for k, v in values.items()}
            sections[name] = ModelSection(preset=preset_name, overrides=coerced)
            continue
        hints = typing.get_type_hints(cls)
        unknown = [k for k in values if k not in hints]
        if unknown:
            raise ConfigError(f"unknown key {name}.{unknown[0]}; [{name}] keys are {', '.join(hints)}")
        given = {k: _coerce(v, hints[k], f"{name}.{k}") for k, v in values.items()}
        sections[name] = dataclasses.replace(default, **given)
    config = schema(**sections)
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    """Range checks that types alone cannot express (and that the model preset and overrides build)."""
    if isinstance(config.model, ModelSection):
        config.model.build()
    positive = {
        "data.context_len": config.data.context_len,
        "train.steps": config.train.steps,
        "train.batch_size": config.train.batch_size,
        "train.grad_accum": config.train.grad_accum,
        "train.max_skipped_steps": config.train.max_skipped_steps,
        "train.log_every": config.train.log_every,
        "eval.batch_size": config.eval.batch_size,
        "checkpoint.keep_last": config.checkpoint.keep_last,
        "optim.lr": config.optim.lr,
    }
    if isinstance(config, TrainConfig):
        positive["data.corpus_documents"] = config.data.corpus_documents
    else:
        positive["data.generated"] = config.data.generated
        positive["eval.max_new_tokens"] = config.eval.max_new_tokens
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    non_negative = {
        "optim.weight_decay": config.optim.weight_decay,
        "optim.qk_clip_tau": config.optim.qk_clip_tau,
        "optim.grad_clip": config.optim.grad_clip,
        "optim.expert_bias_rate": config.optim.expert_bias_rate,
        "optim.warmup_steps": config.optim.warmup_steps,
        "train.checkpoint_every": config.train.checkpoint_every,
        "train.threads": config.train.threads,
        "eval.every": config.eval.every,
        "eval.max_sequences": config.eval.max_sequences,
    }
    if isinstance(config, SFTConfig):
        non_negative["eval.tool_turns"] = config.eval.tool_turns
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if not 0.0 < config.data.heldout_fraction < 1.0:
        raise ConfigError(f"data.heldout_fraction must be in (0, 1), got {config.data.heldout_fraction}")
    if not all(0.0 <= b < 1.0 for b in config.optim.betas):
        raise ConfigError(f"optim.betas must be in [0, 1), got {list(config.optim.betas)}")
    lr_schedule(config)
    validate_parallel(config)


def validate_parallel(config: RunConfig, world_size: int | None = None, *, n_routed_experts: int | None = None) -> None:
    """Every rule of ``[parallel]`` (one ``ConfigError`` line each): the layout against the model and the global
    batch, and, given the launch's ``world_size``, ``pp·dp = WORLD_SIZE``. ``pretrain`` calls it with the world
    size on every rank before any work; ``build_config`` without (a config can be resolved outside torchrun). The
    expert count comes from the model preset, or ``n_routed_experts`` (an SFT run's checkpoint) when given; an SFT
    config without it skips that rule."""
    p = config.parallel
    if n_routed_experts is not None:
        experts = n_routed_experts
    elif isinstance(config.model, ModelSection):
        experts = config.model.build().n_routed_experts
    else:
        experts = p.ep
    for key in ("dp", "ep", "pp"):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallel.{key} must be >= 1, got {getattr(p, key)}")
    if not p.timeout_s > 0:
        raise ConfigError(f"parallel.timeout_s must be > 0, got {p.timeout_s}")
    _validate_pipeline(config)
    if p.dp % p.ep:
        raise ConfigError(
            f"parallel.ep={p.ep} must divide parallel.dp={p.dp} (an expert-parallel group is ep consecutive "
            "data-parallel ranks)"
        )
    if experts % p.ep:
        raise ConfigError(f"parallel.ep={p.ep} must divide model.n_routed_experts={experts} (E/ep experts per rank)")
    if config.train.batch_size % p.dp:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} is the global batch and must be a multiple of "
            f"parallel.dp={p.dp} (each rank takes batch_size/dp sequences)"
        )
    if world_size is not None and p.pp * p.dp != world_size:
        fits = world_size % p.pp == 0  # some dp makes pp·dp = WORLD_SIZE
        raise ConfigError(
            f"parallel: pp·dp = {p.pp * p.dp} but WORLD_SIZE = {world_size}; run {p.pp * p.dp} "
            f"process{'es' if p.pp * p.dp > 1 else ''} "
            f"(torchrun --nproc-per-node={p.pp * p.dp} --no-python k2 {_command(config)} ...) or set "
            + (f"parallel.dp={world_size // p.pp}" if fits else f"parallel.pp=1 and parallel.dp={world_size}")
        )


def _validate_pipeline(config: RunConfig) -> None:
    """The rules of ``parallel.pp*``: ``k2.parallel.plan.check_pipeline``'s layout rules, then what the trainer's
    pipelined step needs (its micro-batches replace gradient accumulation; no packed documents)."""
    p = config.parallel
    if p.pp_microbatches < 0:
        raise ConfigError(f"parallel.pp_microbatches must be >= 0 (0 = parallel.pp), got {p.pp_microbatches}")
    if p.pp == 1:
        return
    if isinstance(config, SFTConfig):
        raise ConfigError(
            f"parallel.pp={p.pp}: k2 sft does not support pipeline parallelism (packed conversations and the tool-call "
            "evaluation need the whole model on a rank); set parallel.pp=1"
        )
    layers = list(p.pp_layers) or None
    check_pipeline(
        config.model.build().num_hidden_layers, p.pp, p.pp_virtual_stages, p.pp_schedule, p.microbatches, layers
    )
    if config.train.grad_accum != 1:
        raise ConfigError(
            f"train.grad_accum={config.train.grad_accum}: with parallel.pp={p.pp} the pipeline's micro-batches "
            "accumulate the gradient; set train.grad_accum=1 and raise parallel.pp_microbatches"
        )
    rows = config.train.batch_size // p.dp
    if rows % p.microbatches:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} over parallel.dp={p.dp} gives {rows} rows per pipeline, "
            f"not a multiple of parallel.pp_microbatches={p.microbatches}"
        )
    if config.data.document_mask:
        raise ConfigError(f"data.document_mask=true is not supported with parallel.pp={p.pp} (packed documents)")
    if config.train.offload_activations:
        raise ConfigError(f"train.offload_activations=true is not supported with parallel.pp={p.pp}")


def _command(config: RunConfig) -> str:
    return "sft" if isinstance(config, SFTConfig) else "pretrain"


def lr_schedule(config: RunConfig) -> schedule.WSD:
    """The run's WSD schedule (``ConfigError`` if warm-up and decay do not fit in ``train.steps``)."""
    o = config.optim
    try:
        return schedule.wsd(
            peak_lr=o.lr,
            total_steps=config.train.steps,
            warmup_steps=o.warmup_steps,
            decay_fraction=o.decay_fraction,
            min_lr_ratio=o.min_lr_ratio,
            decay=o.decay,
        )
    except ConfigError as e:
        raise ConfigError(f"optim schedule: {e}") from None


def load_run_config(
    run_dir: str | os.PathLike[str],
    overrides: list[str] | tuple[str, ...] = (),
    *,
    schema: type[RunConfig] = TrainConfig,
) -> RunConfig:
    """The config saved in ``RUN_DIR/config.toml`` with ``--set`` overrides applied on top (for ``--resume``)."""
    path = Path(run_dir) / CONFIG_FILE
    command = "sft" if schema is SFTConfig else "pretrain"
    if not Path(run_dir).is_dir():
        raise ConfigError(f"--resume: run directory not found: {run_dir}")
    if not path.is_file():
        raise ConfigError(f"--resume: {run_dir} holds no {CONFIG_FILE}; is it a k2 {command} run directory?")
    saved = _read_toml(path)
    if not isinstance(saved.get("model", {}), dict):
        raise ConfigError(f"{path}: [model] must be a table of key = value")
    if schema is SFTConfig and "preset" in saved.get("model", {}):
        raise ConfigError(f"--resume: {run_dir} is a k2 pretrain run; continue it with k2 pretrain --resume")
    if schema is TrainConfig and "path" in saved.get("model", {}):
        raise ConfigError(f"--resume: {run_dir} is a k2 sft run; continue it with k2 sft --resume")
    return build_config(file=path, overrides=overrides, schema=schema)
