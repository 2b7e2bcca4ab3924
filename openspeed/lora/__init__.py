"""LoRA adapters applied to a model from outside, by module-name patterns, in peft's naming.

:func:`apply_lora` swaps the chosen ``nn.Linear`` modules for :class:`LoRALinear` (same ``weight`` and
``bias`` parameters under the same names, plus ``lora_A`` / ``lora_B``), so base weights load and
shard exactly as before and adapters can be saved in the format peft / diffusers load
(:func:`save_peft_adapter`) or merged back into plain linears (:func:`merge_lora`).
"""

from openspeed.lora.layer import (
    LoRALinear,
    adapter_view,
    apply_lora,
    init_lora,
    is_lora_param,
    lora_modules,
    lora_state_dict,
    mark_only_lora_trainable,
    matches,
    merge_lora,
)
from openspeed.lora.peft_format import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    peft_adapter_config,
    save_peft_adapter,
)
from openspeed.lora.training import add_adapters

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "LoRALinear",
    "adapter_view",
    "add_adapters",
    "apply_lora",
    "init_lora",
    "is_lora_param",
    "lora_modules",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "matches",
    "merge_lora",
    "peft_adapter_config",
    "save_peft_adapter",
]
