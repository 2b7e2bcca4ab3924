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


@dataclass
class LoRAConfig:
    rank: int = 0
    """LoRA rank on the model's linear layers (0: no LoRA, the whole model trains)."""
    alpha: float | None = None
    """LoRA scaling numerator: the update is (alpha / rank) * B A; None takes the rank (scale 1)."""
    dropout: float = 0.0
    """Dropout on the adapters' input (peft's lora_dropout), in [0, 1)."""
    targets: list[str] = field(default_factory=list)
    """Module-name patterns of the linear layers that get adapters (globs or name suffixes, native or
    reference names, e.g. blocks.*.self_attn.q_proj, attn1.to_q, visual.blocks.*.attn.qkv).
    Empty: the model family's default targets."""


@dataclass
class ModelConfig:
    path: str = ""
    """Reference-format model directory (config.json, tokenizer, processor; weights optional), or a
    diffusers pipeline directory (model_index.json) or its transformer folder. Its model_type names
    the run's model family."""
    init_std: float | None = None
    """Std of the normal init for weight matrices; None takes the model config's initializer_range."""
    rope_theta: float | None = None
    """Override of the language model's RoPE base (small recipes learn faster with a small base)."""
    freeze: list[str] = field(default_factory=list)
    """Parts that get no gradient and no optimizer state: any of the parts the model family defines."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class DataConfig:
    train_path: str = ""
    val_path: str | None = None
    max_seq_len: int = 2048
    num_workers: int = 0
    generate: str | None = None
    """Synthetic data set made on first use when train_path is missing (a generator a model family
    registers: shapes, moving_shapes)."""
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
    overwrite: bool = False
    """With resume=none: a run_dir that holds a run moves to <run_dir>.previous first (else an error)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16: the step runs under bf16 autocast with fp32 weights (the optimizer's master copy); under
    FSDP2 the parameters are also all-gathered in bf16 and gradients reduced in fp32."""
    compile: bool | None = None
    """Compile each transformer block with torch.compile (regional compilation). None: on for CUDA and
    NPU, off on the CPU (where inductor's first compile takes tens of seconds)."""
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    """torch.compile backend for train.compile (aot_eager: traced graphs without code generation)."""
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
    """Keep an exponential moving average of the trained weights with this decay (None: off); it is
    checkpointed beside the model, and export / sampling can use it."""


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
    tensorboard: bool | None = None
    """null: TensorBoard events too when tensorboard is installed; true: asked for (a warning if not)."""


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
    """The generic sections, plus the run's model family's own section as an attribute
    (``cfg.wan``), declared by the family (:mod:`openspeed.models.families`), not here."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def __post_init__(self) -> None:
        self.family: str | None = None
        """The run's model family, once known (see :func:`bind_family`)."""
        self.family_sections: dict[str, Any] = {}
        """Family name -> its config section (only the run's family's once bound)."""
        self.explicit: dict[str, str] = {}
        """``section.key`` set in the YAML or on the command line -> the spelling the user wrote."""

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("family_sections") or {}
        if name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__} has no section '{name}'")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}
        for name, section in self.family_sections.items():
            out[name] = dataclasses.asdict(section)
        return out


GENERIC_SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig))


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


def _family_index():
    """(family name -> Family, old spelling -> new key) of every registered family (light imports)."""
    from openspeed.models.families import families

    found = {f.name: f for f in families()}
    aliases = {old: new for f in found.values() for old, new in f.aliases.items()}
    return found, aliases


def _move_aliases(raw: dict[str, Any], aliases: dict[str, str]) -> dict[str, str]:
    """Rewrite old spellings in ``raw`` (in place) to their family keys; returns new key -> old spelling."""
    spelled: dict[str, str] = {}
    for old, new in aliases.items():
        section, key = old.split(".", 1)
        block = raw.get(section)
        if not isinstance(block, dict) or key not in block:
            continue
        new_section, new_key = new.split(".", 1)
        target = raw.setdefault(new_section, {})
        if target is None:
            target = raw[new_section] = {}
        if not isinstance(target, dict):
            raise ConfigError(f"{new_section}: expected a mapping of keys, got {_describe(target)}")
        if new_key in target:
            raise ConfigError(f"{old} and {new} are the same key (the old and the new spelling): set one")
        target[new_key] = block.pop(key)
        spelled[new] = old
    return spelled


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from a nested dict, rejecting unknown keys and wrong types.

    Top-level sections are the generic ones and those of the registered model families; old
    spellings of family keys (``data.text_len``) are read as the family's (``wan.text_len``).
    """
    if not isinstance(raw, dict):
        raise ConfigError("config: the top level must be a mapping of sections")
    found, aliases = _family_index()
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    spelled = _move_aliases(raw, aliases)
    hints = typing.get_type_hints(RunConfig)
    built, family_sections = {}, {}
    for key, value in raw.items():
        if key in GENERIC_SECTIONS:
            built[key] = _build_section(key, hints[key], value)
        elif key in found and found[key].section is not None:
            family_sections[key] = _build_section(key, found[key].section, value)
        else:
            known = [*GENERIC_SECTIONS, *sorted(n for n, f in found.items() if f.section is not None)]
            raise ConfigError(f"unknown config section '{key}' (known: {', '.join(known)})")
    cfg = RunConfig(**built)
    cfg.family_sections = family_sections
    for section, value in raw.items():
        if isinstance(value, dict):
            for key in value:
                full = f"{section}.{key}"
                cfg.explicit[full] = spelled.get(full, full)
    return cfg


def _value_of(cfg: RunConfig, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def _default_of(cfg: RunConfig, key: str) -> Any:
    section, name = key.split(".", 1)
    obj = getattr(cfg, section)
    return getattr(type(obj)(), name)


def family_from_config(cfg: RunConfig):
    """The run's family as far as it is known now: ``model.path``'s model type, else the family of
    the ``data.generate`` generator that will write it (``None`` when neither tells yet)."""
    from openspeed.models.families import family_of_model_dir, generator

    from_model = family_of_model_dir(cfg.model.path) if cfg.model.path else None
    if cfg.data.generate:
        gen_family, _ = generator(cfg.data.generate)
        if from_model is not None and from_model.name != gen_family.name:
            raise ConfigError(
                f"data.generate={cfg.data.generate} makes {gen_family.name} data, but model.path "
                f"{cfg.model.path} is a {from_model.name} model"
            )
        return from_model or gen_family
    return from_model


def bind_family(cfg: RunConfig, family, run_config: bool = False) -> None:
    """Make ``family`` the run's: give it its section, and refuse what it cannot honour.

    One-line errors: a key of another family's section (in any spelling), a ``model.freeze`` part the
    family does not define, a generic key the family refuses, a ``data.generate_*`` key the chosen
    generator does not read. ``run_config``: the config.yaml of an earlier run, which earlier versions
    wrote with every key at its default; keys of other families left at their defaults are dropped.
    """
    from openspeed.models.families import LEGACY_LORA_TARGETS, generator

    for name in list(cfg.family_sections):
        if name == family.name:
            continue
        keys = [k for k in cfg.explicit if k.startswith(f"{name}.")]
        if run_config:
            keys = [k for k in keys if _value_of(cfg, k) != _default_of(cfg, k)]
        if keys:
            raise ConfigError(
                f"{cfg.explicit[keys[0]]}: a {name} key, but this run's model ({cfg.model.path or 'model.path'}) "
                f"is a {family.name} model"
            )
        del cfg.family_sections[name]
        for k in [k for k in cfg.explicit if k.startswith(f"{name}.")]:
            del cfg.explicit[k]
    if family.section is not None and family.name not in cfg.family_sections:
        cfg.family_sections[family.name] = family.section()
    for part in cfg.model.freeze:
        if part not in family.parts:
            raise ConfigError(
                f"model.freeze: unknown part '{part}' for a {family.name} model (choose from {', '.join(family.parts)})"
            )
    for key, why in family.refused.items():
        if _value_of(cfg, key) != _default_of(cfg, key):
            raise ConfigError(f"{key}: not available for {family.name} runs ({why})")
    if cfg.data.generate:
        _, gen = generator(cfg.data.generate)
        for key in (f.name for f in dataclasses.fields(DataConfig)):
            if key.startswith("generate_") and key not in ("generate_dir", "generate_num") and key not in gen.keys:
                if _value_of(cfg, f"data.{key}") != _default_of(cfg, f"data.{key}"):
                    raise ConfigError(f"data.{key}: the {gen.name} generator does not read it")
    targets = list(cfg.model.lora.targets)
    if not targets or (targets == list(LEGACY_LORA_TARGETS) and tuple(family.lora_targets) != LEGACY_LORA_TARGETS):
        cfg.model.lora.targets = list(family.lora_targets)
    section = cfg.family_sections.get(family.name)
    if section is not None and hasattr(section, "check"):
        section.check()
    if getattr(family, "check", None) is not None:
        family.check(cfg)
    cfg.family = family.name


def bind_known_family(cfg: RunConfig, run_config: bool = False) -> None:
    """:func:`bind_family` with the family :func:`family_from_config` finds, if it finds one."""
    family = family_from_config(cfg)
    if family is not None:
        bind_family(cfg, family, run_config=run_config)


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


def load_config(path: str | None, overrides: list[str] | None = None, run_config: bool = False) -> RunConfig:
    """Read ``path`` (may be None for all defaults), apply ``key=value`` overrides, validate types.

    When the run's model family is known already (its model directory exists, or ``data.generate``
    names its generator) the config is bound to it (:func:`bind_family`); ``run_config`` reads the
    config.yaml an earlier run wrote (see there).
    """
    raw = load_yaml(path) if path else {}
    for item in overrides or []:
        key, value = parse_override(item)
        apply_override(raw, key, value)
    cfg = from_dict(raw)
    cfg.parallel.cp_algo = CP_ALGO_ALIASES.get(cfg.parallel.cp_algo, cfg.parallel.cp_algo)
    if path:
        _resolve_paths(cfg, os.path.dirname(os.path.abspath(path)))
    check_values(cfg)
    bind_known_family(cfg, run_config=run_config)
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
    _check_lora_values(cfg)
    cfg.memory.check()
    if cfg.train.ema_decay is not None and not 0 <= cfg.train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay: must be in [0, 1), got {cfg.train.ema_decay}")
    for section in cfg.family_sections.values():
        if hasattr(section, "check"):
            section.check()
    if cfg.train.global_batch_size % cfg.train.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={cfg.train.micro_batch_size}"
        )


def _check_lora_values(cfg: RunConfig) -> None:
    lora = cfg.model.lora
    if lora.rank < 0:
        raise ConfigError(f"model.lora.rank: must not be negative, got {lora.rank}")
    if lora.alpha is not None and not lora.alpha > 0:
        raise ConfigError(f"model.lora.alpha: must be positive, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"model.lora.dropout: must be in [0, 1), got {lora.dropout}")
    for pattern in lora.targets:
        if not isinstance(pattern, str) or not pattern.strip():
            raise ConfigError(f"model.lora.targets: '{pattern}' is not a module-name pattern")


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
    """Write the resolved config (generic sections and the family's) as YAML."""
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)

