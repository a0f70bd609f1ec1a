"""HaloNet family (Vaswani et al. 2021; timm `ByobNet` `halonet*` layouts). Importing registers the variants
and the timm weight loader."""
from jaxattn.models.halonet import convert, variants  # noqa: F401  (registration side effects)
from jaxattn.models.halonet.config import AttnCfg, BlockCfg, interleave, make_divisible, stage
from jaxattn.models.halonet.model import BottleneckBlock, HaloNet, SelfAttnBlock

__all__ = ["AttnCfg", "BlockCfg", "interleave", "make_divisible", "stage", "BottleneckBlock", "HaloNet",
           "SelfAttnBlock"]
