"""Weight import from reference checkpoints (PyTorch state dicts as name -> numpy array; no torch import).

Family converters live beside their models and are exposed here:
`load_timm`, `load_dinat`, `load_biformer` (fill an existing model) and `from_timm`, `from_dinat`,
`from_biformer` (build the matching registered model, then load). See `common.StrictLoader`.
"""
from jaxattn.models.convert.common import StateDictError, StrictLoader, torch_conv, torch_linear

__all__ = ["StateDictError", "StrictLoader", "torch_conv", "torch_linear"]
