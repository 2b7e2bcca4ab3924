"""What the command line and the config need to know about each model family, without importing torch.

Every folder under ``openspeed/models/`` that has a ``family.py`` is a family: that module calls
:func:`register_family` with a :class:`Family`: the family's name (also the name of its top-level
config section), the ``model_type`` values of the reference configs it reads, its config section (a
dataclass), the old spellings of its keys, its freezable parts and default LoRA targets, the generic
keys it refuses, and the commands it adds to ``openspeed`` (synthetic data generators, ``generate``,
...). The heavy half of a family (model, task, parallel plans) is its ``spec.py``
(:mod:`openspeed.models.registry`), imported only once training or loading starts.

Adding a family therefore touches nothing outside its folder: the registry finds it by looking.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from openspeed.errors import ConfigError

# What every earlier version wrote into a run's config.yaml as ``model.lora.targets`` when the user
# left it at the default; a run config holding exactly this list means "the family's default".
LEGACY_LORA_TARGETS = ("self_attn.*_proj", "cross_attn.*_proj", "ffn.fc1", "ffn.fc2")


@dataclass(frozen=True)
class Command:
    """A command line verb a family adds: ``openspeed NAME ...`` or ``openspeed data NAME ...``.

    Attributes:
        name: the verb (``generate``, or a ``data`` sub-command such as ``moving-shapes``).
        usage: the lines it adds to ``openspeed --help``.
        run: ``(argv) -> exit status``; imports what it needs when called.
    """

    name: str
    usage: str
    run: Callable[[list[str]], int]


@dataclass(frozen=True)
class Generator:
    """A synthetic data set a config can ask for with ``data.generate: NAME`` (made on first use).

    Attributes:
        name: the value of ``data.generate``.
        prepare: ``(run_config) -> None``; writes the data (and a tiny model dir) the config names.
        keys: the ``data.generate_*`` keys it reads besides ``generate_dir`` and ``generate_num``; the
            others are refused when set.
    """

    name: str
    prepare: Callable[[Any], None]
    keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    """The light half of a model family (see the module docstring).

    Attributes:
        name: short name; also the name of the family's config section.
        model_types: ``config.json`` ``model_type`` (or diffusers ``_class_name``) values it reads.
        spec_module: the module whose import registers the family's :class:`ModelSpec`.
        section: dataclass of the family's own config section (``None``: it has none). It may define
            ``check(self)``, called with the other value checks.
        aliases: old spelling -> key in the family's section (``data.text_len`` -> ``wan.text_len``).
        parts: the freezable parts (``model.freeze`` accepts exactly these).
        lora_targets: default ``model.lora.targets`` (module-name patterns).
        refused: generic key -> why this family's runs cannot honour it (refused when set).
        generators: the synthetic data sets of ``data.generate``.
        commands: top-level verbs (``openspeed generate``).
        data_commands: ``openspeed data`` sub-commands.
        check: ``(run_config) -> None``; combinations the family refuses, checked once it is bound.
        shapes_config: ``(config, preprocessor) -> (config, preprocessor)``: this family's tiny model
            for the synthetic shapes VQA set (``config.json`` and ``preprocessor_config.json`` dicts),
            from the Qwen2.5-VL ones the set's writer builds around its tokenizer
            (``openspeed data shapes --family NAME``); ``None``: the family cannot train on that set.
    """

    name: str
    model_types: tuple[str, ...]
    spec_module: str
    parts: tuple[str, ...]
    lora_targets: tuple[str, ...]
    section: type | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    generators: tuple[Generator, ...] = ()
    commands: tuple[Command, ...] = ()
    data_commands: tuple[Command, ...] = ()
    check: Callable[[Any], None] | None = None
    shapes_config: Callable[[dict, dict], tuple[dict, dict]] | None = None


_FAMILIES: dict[str, Family] = {}
_discovered = False


def register_family(family: Family) -> None:
    """Add ``family`` (called by each family's ``family.py``); re-registering the same name replaces it."""
    for other in _FAMILIES.values():
        if other.name == family.name:
            continue
        clash = set(other.model_types) & set(family.model_types)
        if clash:
            raise ValueError(f"model type {sorted(clash)[0]!r} is already registered by family '{other.name}'")
    _FAMILIES[family.name] = family


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    import openspeed.models as models

    for info in sorted(pkgutil.iter_modules(models.__path__), key=lambda m: m.name):
        if info.ispkg and os.path.isfile(os.path.join(models.__path__[0], info.name, "family.py")):
            importlib.import_module(f"openspeed.models.{info.name}.family")


def families() -> list[Family]:
    """Every registered family, by name."""
    _discover()
    return [_FAMILIES[name] for name in sorted(_FAMILIES)]


def get_family(name: str) -> Family:
    _discover()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model family '{name}' (known: {', '.join(sorted(_FAMILIES))})") from None


def family_of_model_type(model_type: str) -> Family:
    """The family that reads ``model_type``; a one-line error naming the known types if none does."""
    for family in families():
        if model_type in family.model_types:
            return family
    known = ", ".join(sorted(t for f in families() for t in f.model_types))
    raise ConfigError(f"model type '{model_type}' is not supported (known: {known})")


def model_config_path(path: str) -> str | None:
    """The ``config.json`` describing the trained model at ``path``: its own, or a diffusers
    pipeline's ``transformer/config.json`` (``None`` when there is neither)."""
    own = os.path.join(path, "config.json")
    if os.path.isfile(own):
        return own
    if os.path.isfile(os.path.join(path, "model_index.json")):
        inner = os.path.join(path, "transformer", "config.json")
        return inner if os.path.isfile(inner) else None
    return None


def family_of_model_dir(path: str) -> Family | None:
    """The family of the model directory ``path`` (read from its ``config.json`` alone; ``None`` when
    the directory has none yet). An unreadable config or an unknown model type is a one-line error."""
    config_path = model_config_path(path) if path else None
    if config_path is None:
        return None
    try:
        with open(config_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model.path: cannot read {config_path}: {exc}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) and isinstance(config, dict):
        model_type = config.get("_class_name")
    if not isinstance(model_type, str):
        raise ConfigError(f"model.path: {config_path} has no model_type")
    return family_of_model_type(model_type)


def generator(name: str) -> tuple[Family, Generator]:
    """The family and generator of ``data.generate: name``."""
    for family in families():
        for gen in family.generators:
            if gen.name == name:
                return family, gen
    known = ", ".join(sorted(g.name for f in families() for g in f.generators))
    raise ConfigError(f"data.generate: unknown generator '{name}' (known: {known})")


def commands() -> dict[str, Command]:
    """Top-level verbs the families add, by name."""
    return {c.name: c for f in families() for c in f.commands}


def data_commands() -> dict[str, Command]:
    """``openspeed data`` sub-commands the families add, by name."""
    return {c.name: c for f in families() for c in f.data_commands}


__all__ = [
    "Command",
    "Family",
    "Generator",
    "LEGACY_LORA_TARGETS",
    "commands",
    "data_commands",
    "families",
    "family_of_model_dir",
    "family_of_model_type",
    "generator",
    "get_family",
    "model_config_path",
    "register_family",
]
