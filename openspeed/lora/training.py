"""LoRA on a registry model: the adapters its run config asks for, in the family's names.

A LoRA run trains only the adapters; the base weights stay exactly what the run started from: the
reference weights of ``model.path``, or, when that directory has none, the weights drawn from
(``train.seed``, parameter name). Checkpoints therefore hold the adapters (and their optimizer
state) alone, and the base is rebuilt from the same source on resume and export
(:mod:`openspeed.training.model_setup`, :mod:`openspeed.training.run_loading`).
"""

from __future__ import annotations

from torch import nn

from openspeed.errors import ConfigError
from openspeed.lora.layer import apply_lora


def add_adapters(model: nn.Module, spec, lora) -> list[str]:
    """Put the adapters ``lora`` (a run's ``model.lora``, targets resolved to the family's default)
    asks for into ``model`` (meta or materialised), in place; returns their names.

    Targets may use native names or the reference library's (``spec.module_name_to_ref``). A head
    tied to the input embedding is refused: its update could not be merged or exported apart from
    the embedding it shares its weight with.
    """
    if not lora.targets:
        raise ConfigError("model.lora.targets: give at least one module-name pattern")
    adapted = apply_lora(model, list(lora.targets), lora.rank, lora.alpha, alias=spec.module_name_to_ref,
                         dropout=lora.dropout)
    if "lm_head" in adapted and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        raise ConfigError("model.lora.targets: lm_head is tied to the input embedding (tie_word_embeddings); "
                          "leave it out")
    return adapted


__all__ = ["add_adapters"]
