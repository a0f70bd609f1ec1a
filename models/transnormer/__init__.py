"""TransNormerLLM (Qin et al. 2023) on `jaxattn.lightning_attention`: `transnormer_{tiny,385m,1b,7b}`."""
from jaxattn.models.transnormer import variants
from jaxattn.models.transnormer.model import GLA, transnormer
