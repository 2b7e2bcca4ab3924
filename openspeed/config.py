"""Typed run configuration: YAML file + dotted ``key=value`` overrides + Megatron-style aliases.

This module imports neither torch nor transformers, so a bad config is reported in a fraction
of a second, before any heavy import.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

from openspeed.errors import ConfigError

PARALLEL_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


# Default LoRA targets: the Wan DiT's attention projections and FFN; Qwen2.5-VL's decoder attention
# and MLP projections plus the vision blocks' attention and MLP (not the merger or the LM head).
WAN_LORA_TARGETS = ("self_attn.*_proj", "cross_attn.*_proj", "ffn.fc1", "ffn.fc2")
VLM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                    "attn.qkv", "attn.proj")


@dataclass
class LoRAConfig:
    rank: int = 0
    """LoRA rank on the model's linear layers (0: no LoRA, the whole model trains)."""
    alpha: float | None = None
    """LoRA scaling numerator: the update is (alpha / rank) * B A; None takes the rank (scale 1)."""
    dropout: float = 0.0
    """Dropout on the adapters' input (peft's lora_dropout), in [0, 1)."""
    targets: list[str] = field(default_factory=lambda: list(WAN_LORA_TARGETS))
    """Module-name patterns of the linear layers that get adapters (globs or name suffixes, native,
    diffusers or Hugging Face names, e.g. blocks.*.self_attn.q_proj, attn1.to_q, visual.blocks.*.attn.qkv).
    Left at the default, each model family takes its own (WAN_LORA_TARGETS / VLM_LORA_TARGETS)."""


@dataclass
class ModelConfig:
    path: str = ""
    """Hugging Face-format model directory (config.json, tokenizer, processor; weights optional), or a
    diffusers Wan pipeline directory (model_index.json) or its transformer folder."""
    init_std: float | None = None
    """Std of the normal init for weight matrices; None takes the model config's initializer_range."""
    rope_theta: float | None = None
    """Override of the language model's RoPE base (small recipes learn faster with a small base)."""
    freeze: list[str] = field(default_factory=list)
    """Parts that get no gradient and no optimizer state: any of vision, merger, llm."""
    vae: Literal["pipeline", "identity"] = "pipeline"
    """Wan: the pipeline's VAE, or identity (pixel space: the latent is the video in [-1, 1])."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class DataConfig:
    train_path: str = ""
    val_path: str | None = None
    max_seq_len: int = 2048
    num_workers: int = 0
    generate: Literal["shapes", "moving_shapes"] | None = None
    """Synthetic data set made on first use when train_path is missing."""
    generate_dir: str | None = None
    generate_num: int = 2000
    generate_turns: int = 1
    """Questions per training image in the synthetic set (validation always asks one)."""
    generate_val_num: int | None = None
    """Validation records of the synthetic set (None: a tenth of generate_num)."""
    generate_text_layers: int = 4
    """Decoder layers of the synthetic set's tiny model."""
    generate_vision_width: int = 64
    """Vision-tower width of the synthetic set's tiny model (its MLP is twice as wide)."""
    packing: bool = False
    video_buckets: list[str] = field(default_factory=lambda: ["81x480x832"])
    """Wan: FRAMESxHEIGHTxWIDTH buckets clips are resized / cropped into."""
    frame_interval: int = 1
    """Wan: take every N-th frame of a clip, from its first."""
    text_len: int = 512
    """Wan: caption tokens (UMT5 states, zero-padded); image-to-video needs 512."""
    caption_dropout: float = 0.1
    """Wan: probability of training a sample on the empty caption (for classifier-free guidance)."""
    generate_jitter: float = 3.0
    """moving_shapes: largest random offset (pixels) of a path across and along its direction."""
    generate_dit: dict = field(default_factory=dict)
    """moving_shapes: WanTransformer3DModel arguments of the demo's tiny DiT (over the defaults)."""


@dataclass
class ParallelConfig:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1
    """-1: whatever the world size leaves after the other dimensions."""
    cp: int = 1
    tp: int = 1
    sequence_parallel: bool = False
    zero_stage: Literal[2, 3] = 3
    virtual_stages: int = 1
    pp_schedule: Literal["1f1b", "gpipe", "interleaved_1f1b", "zero_bubble", "dualpipev"] = "1f1b"
    pipeline_num_layers: list[int] | None = None
    cp_algo: Literal["ulysses", "ring", "hybrid", "ulysses_cp_algo", "megatron_cp_algo", "hybrid_cp_algo"] = (
        "ulysses"
    )
    cp_ulysses_degree: int | None = None


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    max_steps: int = 100
    seed: int = 42
    resume: str = "none"
    """auto (latest complete checkpoint in run_dir, if any) | none | a checkpoint directory."""
    precision: Literal["fp32", "bf16"] = "fp32"
    cpu_threads: int | None = None
    """Intra-op threads per process on the CPU (None: torch's default, OMP_NUM_THREADS)."""
    micro_batch_size: int = 1
    global_batch_size: int = 8
    eval_interval: int = 0
    """Validate every N steps (0: only at the end)."""
    eval_max_samples: int | None = None
    eval_blank_images: bool = False
    """At the end, also answer the validation questions with blank images and print the held-out line."""
    grad_clip: float = 1.0
    optimization_level: Literal[0, 1, 2] = 2
    peak_tflops: float | None = None
    """The device's peak TFLOP/s for MFU (None: measured once per device and dtype, then cached)."""
    deterministic: bool = False
    exit_interval: int | None = None
    """Save a checkpoint and exit after a step divisible by this (Megatron's --exit-interval)."""
    ema_decay: float | None = None
    """Wan: keep an exponential moving average of the trained weights with this decay (None: off)."""
    flow_shift: float = 5.0
    """Wan: timestep shift of flow matching, sigma = shift*u / (1 + (shift-1)*u); also sampling's default."""
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    """Wan: distribution of u before the shift."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant", "linear"] = "cosine"


@dataclass
class MemoryConfig:
    recompute: Literal["none", "selective", "full", "activation", "norm"] = "none"
    """Activation recomputation (openspeed.memory.recompute): full keeps only each layer's inputs,
    selective keeps matmul/attention outputs, activation recomputes the MLP activation, norm the norms."""
    recompute_num_layers: int | None = None
    """Recompute the first N layers of each layer stack (per pipeline stage); None: every layer."""
    offload_activations: list[str] = field(default_factory=list)
    """Modules whose saved activations wait in host memory: attention, mlp, norm, layer (optionally
    stack-qualified, e.g. text.attention) or globs over module paths."""
    offload_optimizer: bool = False
    """AdamW state on the host, updated there (openspeed.memory.offload.OffloadedAdamW)."""
    offload_master_weights: bool = False
    """With offload_optimizer: keep fp32 master weights on the host too."""
    budget_gb: float | None = None
    """Adaptive recompute: after a measured first step, recompute the fewest layers that bring one
    micro-batch's saved activations (plus model and optimizer state) under this many GB per rank."""

    def check(self) -> None:
        """Value checks that need no torch (called from ``check_values``)."""
        if self.recompute_num_layers is not None and self.recompute_num_layers < 0:
            raise ConfigError(f"memory.recompute_num_layers: must not be negative, got {self.recompute_num_layers}")
        if self.budget_gb is not None and not self.budget_gb > 0:
            raise ConfigError(f"memory.budget_gb: must be positive, got {self.budget_gb}")
        if self.budget_gb is not None and self.recompute != "none":
            raise ConfigError(
                f"memory.budget_gb chooses what to recompute itself: leave memory.recompute at none "
                f"(got {self.recompute})"
            )
        if self.offload_master_weights and not self.offload_optimizer:
            raise ConfigError("memory.offload_master_weights needs memory.offload_optimizer=true")


@dataclass
class CheckpointConfig:
    interval: int = 0
    """Save every N steps (0: only at the end)."""
    keep_last: int | None = None
    save_final: bool = True


@dataclass
class LoggingConfig:
    progress: bool = True
    tensorboard: bool = True


@dataclass
class ProfileConfig:
    enabled: bool = False
    step_start: int = 2
    step_end: int = 3
    ranks: list[int] = field(default_factory=lambda: [0])
    with_cpu: bool = True
    with_stack: bool = False
    with_memory: bool = False
    record_shapes: bool = False
    save_path: str | None = None


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Megatron / MindSpeed flag spellings users bring along, mapped onto our keys.
FLAG_ALIASES = {
    "--tensor-model-parallel-size": "parallel.tp",
    "--pipeline-model-parallel-size": "parallel.pp",
    "--context-parallel-size": "parallel.cp",
    "--micro-batch-size": "train.micro_batch_size",
    "--global-batch-size": "train.global_batch_size",
    "--lr": "optim.lr",
    "--train-iters": "train.max_steps",
    "--seed": "train.seed",
    "--save": "train.run_dir",
    "--load": "train.resume",
}

CP_ALGO_ALIASES = {"ulysses_cp_algo": "ulysses", "megatron_cp_algo": "ring", "hybrid_cp_algo": "hybrid"}


# ----------------------------------------------------------------------------- coercion


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else f"{value!r} ({type(value).__name__})"


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to ``annotation`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none", "~") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: invalid value {_describe(value)}")
    if origin is Literal:
        for choice in args:
            try:
                if _coerce(key, value, type(choice)) == choice:
                    return choice
            except ConfigError:
                continue
        choices = ", ".join(str(c) for c in args)
        raise ConfigError(f"{key}: expected one of {choices}, got {_describe(value)}")
    if origin is list:
        (item_type,) = args
        if isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, str) and value.strip() == "[]":
            value = []
        elif not isinstance(value, list):
            value = [value]
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        return _build_section(key, annotation, value)
    if annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
        if isinstance(value, int):
            return value
        number = _as_number(value)
        if number is not None and math.isfinite(number) and float(number).is_integer():
            return int(number)
        raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {_describe(value)}")
        number = _as_number(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {_describe(value)}")
        return float(number)
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {_describe(value)}")
    raise ConfigError(f"{key}: unsupported type {annotation!r}")  # a schema bug, not a user one


_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _as_number(value: Any) -> float | int | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _NUMBER.match(value.strip().replace("_", "")):
        return float(value.strip().replace("_", ""))
    return None


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {_describe(raw)}")
    hints = _section_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{name}.{key}' (known in {name}: {', '.join(sorted(known))})")
        values[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**values)


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError("config: the top level must be a mapping of sections")
    sections = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    hints = typing.get_type_hints(RunConfig)
    built = {}
    for key, value in raw.items():
        if key not in sections:
            raise ConfigError(f"unknown config section '{key}' (known: {', '.join(sections)})")
        built[key] = _build_section(key, hints[key], value)
    return RunConfig(**built)


# ----------------------------------------------------------------------------- parsing


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", YAML scalar of value)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", key):
        raise ConfigError(f"cannot read override '{text}': expected section.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def apply_override(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def load_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    return raw or {}


def load_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` (may be None for all defaults), apply ``key=value`` overrides, validate types."""
    raw = load_yaml(path) if path else {}
    for item in overrides or []:
        key, value = parse_override(item)
        apply_override(raw, key, value)
    cfg = from_dict(raw)
    cfg.parallel.cp_algo = CP_ALGO_ALIASES.get(cfg.parallel.cp_algo, cfg.parallel.cp_algo)
    if path:
        _resolve_paths(cfg, os.path.dirname(os.path.abspath(path)))
    check_values(cfg)
    return cfg


def _resolve_paths(cfg: RunConfig, base_dir: str) -> None:
    """Relative data/model paths in a config file are taken relative to the working directory.

    We keep them as written: configs in ``examples/`` are meant to be run from the repository root,
    as MindSpeed-MM's are. Only ``~`` is expanded.
    """
    for section, key in (("model", "path"), ("data", "train_path"), ("data", "val_path"), ("train", "run_dir")):
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if isinstance(value, str) and value.startswith("~"):
            setattr(obj, key, os.path.expanduser(value))


def check_values(cfg: RunConfig) -> None:
    """Range checks that need no model, data or torch."""
    positive = {
        "train.max_steps": cfg.train.max_steps,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.global_batch_size": cfg.train.global_batch_size,
        "data.max_seq_len": cfg.data.max_seq_len,
        "parallel.pp": cfg.parallel.pp,
        "parallel.dp_replicate": cfg.parallel.dp_replicate,
        "parallel.cp": cfg.parallel.cp,
        "parallel.tp": cfg.parallel.tp,
        "parallel.virtual_stages": cfg.parallel.virtual_stages,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    if cfg.parallel.dp_shard == 0 or cfg.parallel.dp_shard < -1:
        raise ConfigError(f"parallel.dp_shard: must be at least 1 (or -1 for the rest), got {cfg.parallel.dp_shard}")
    for key, value in {
        "train.eval_interval": cfg.train.eval_interval,
        "checkpoint.interval": cfg.checkpoint.interval,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "data.num_workers": cfg.data.num_workers,
        "train.exit_interval": cfg.train.exit_interval or 0,
    }.items():
        if value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr: must be positive, got {cfg.optim.lr}")
    if cfg.checkpoint.keep_last is not None and cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last: must be at least 1, got {cfg.checkpoint.keep_last}")
    for part in cfg.model.freeze:
        if part not in ("vision", "merger", "llm"):
            raise ConfigError(f"model.freeze: unknown part '{part}' (choose from vision, merger, llm)")
    _check_video_values(cfg)
    cfg.memory.check()
    if cfg.train.global_batch_size % cfg.train.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={cfg.train.micro_batch_size}"
        )


def _check_video_values(cfg: RunConfig) -> None:
    """Range checks of the video-generation (Wan) keys."""
    lora, data, train = cfg.model.lora, cfg.data, cfg.train
    if lora.rank < 0:
        raise ConfigError(f"model.lora.rank: must not be negative, got {lora.rank}")
    if lora.alpha is not None and not lora.alpha > 0:
        raise ConfigError(f"model.lora.alpha: must be positive, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"model.lora.dropout: must be in [0, 1), got {lora.dropout}")
    if lora.rank and not lora.targets:
        raise ConfigError("model.lora.targets: give at least one module-name pattern")
    for pattern in lora.targets:
        if not isinstance(pattern, str) or not pattern.strip():
            raise ConfigError(f"model.lora.targets: '{pattern}' is not a module-name pattern")
    for bucket in data.video_buckets:
        if not re.fullmatch(r"\s*[1-9]\d*x[1-9]\d*x[1-9]\d*\s*", str(bucket).lower()):
            raise ConfigError(f"data.video_buckets: '{bucket}' is not FRAMESxHEIGHTxWIDTH (e.g. 81x480x832)")
    if data.frame_interval < 1:
        raise ConfigError(f"data.frame_interval: must be at least 1, got {data.frame_interval}")
    if data.text_len < 1:
        raise ConfigError(f"data.text_len: must be at least 1, got {data.text_len}")
    if not 0 <= data.caption_dropout < 1:
        raise ConfigError(f"data.caption_dropout: must be in [0, 1), got {data.caption_dropout}")
    if train.ema_decay is not None and not 0 <= train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay: must be in [0, 1), got {train.ema_decay}")
    if not train.flow_shift > 0:
        raise ConfigError(f"train.flow_shift: must be positive, got {train.flow_shift}")


def resolve_layout(cfg: RunConfig, world_size: int) -> dict[str, int]:
    """Fill ``dp_shard=-1`` and check that the mesh product equals the world size."""
    p = cfg.parallel
    sizes = {name: getattr(p, name) for name in PARALLEL_DIMS}
    others = sizes["pp"] * sizes["dp_replicate"] * sizes["cp"] * sizes["tp"]
    if sizes["dp_shard"] == -1:
        if world_size % others:
            raise ConfigError(
                f"parallel: pp*dp_replicate*cp*tp = {others} does not divide the world size {world_size}"
            )
        sizes["dp_shard"] = world_size // others
    product = others * sizes["dp_shard"]
    if product != world_size:
        spelled = "*".join(f"{n}={sizes[n]}" for n in PARALLEL_DIMS)
        raise ConfigError(f"parallel: {spelled} = {product} does not equal the world size {world_size}")
    dp = sizes["dp_replicate"] * sizes["dp_shard"]
    step_unit = cfg.train.micro_batch_size * dp
    if cfg.train.global_batch_size % step_unit:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of "
            f"micro_batch_size*dp = {cfg.train.micro_batch_size}*{dp}"
        )
    return sizes


def dump_yaml(cfg: RunConfig, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)

