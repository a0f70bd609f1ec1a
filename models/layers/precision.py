"""Mixed precision: the `dtype` (compute) and `param_dtype` (storage) every family takes.

Parameters are stored in `param_dtype` (default float32, so optimizer moments are float32 too) and cast to `dtype`
where they are used; matmuls and attention run in `dtype` (None: the promoted dtype of the inputs, float32 for the
zoo). What must stay float32 whatever `dtype` is: softmax statistics and attention logits (the ops accumulate in
float32), norms (computed in float32, returned in `dtype`), the LM head's logits and every loss.
"""
from __future__ import annotations

import jax.numpy as jnp


def check_dtype(name: str, value, *, allow_none: bool = False):
    """`value` (a dtype or its name, e.g. 'bfloat16') as a numpy dtype; `ValueError` naming `name` unless it is
    a floating-point dtype (or None where `allow_none`)."""
    if value is None and allow_none:
        return None
    try:
        dtype = None if value is None else jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`{name}` must be a floating-point dtype such as 'float32' or 'bfloat16', got {value!r}")
    return dtype
