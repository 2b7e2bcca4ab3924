"""Ops with a plain-PyTorch reference and a fast path (``fast=True``) that tests compare against it.

Import from the submodules (``from openspeed.ops.rms_norm import rms_norm``): ``attention``,
``rms_norm``, ``swiglu``, ``rope`` (1-D, M-RoPE, vision, 3-D video), ``cross_entropy`` (fused linear +
cross-entropy), ``adamw`` (AdamW with a fused weight EMA). The ops import nothing from
``openspeed.models``, so model layers can call into them.
"""
