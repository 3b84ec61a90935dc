"""nemojax: NVIDIA Nemotron-H hybrid Mamba-2/Transformer language models in JAX."""

from nemojax.cache import Cache, KVState, MambaState, init_cache
from nemojax.checkpoint import load, save
from nemojax.config import CheckpointError, ConfigError, LayerType, NemotronHConfig
from nemojax.generate import Generation, generate
from nemojax.model import NemotronH
from nemojax.sampler import Sampler
from nemojax.sampling import SamplingParams
from nemojax.tokenizer import DecodeStream, Tokenizer

__version__ = "0.1.0"

__all__ = [
    "Cache", "CheckpointError", "ConfigError", "KVState", "LayerType", "MambaState", "NemotronH",
    "NemotronHConfig", "init_cache", "load", "save", "generate", "Generation", "Sampler",
    "SamplingParams", "Tokenizer", "DecodeStream",
]
