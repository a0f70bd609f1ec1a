"""DiNAT / NAT: neighborhood attention transformers (`dinat_pico` .. `dinat_large`), with weight import."""
from jaxattn.models.dinat import convert, stacking, variants
from jaxattn.models.dinat.model import DiNAT, default_dilations

__all__ = ["DiNAT", "default_dilations", "convert", "stacking", "variants"]
