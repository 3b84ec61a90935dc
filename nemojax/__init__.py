"""nemojax: NVIDIA Nemotron-H hybrid Mamba-2/Transformer language models in JAX."""

import importlib.metadata

from nemojax.cache import Cache, KVState, MambaState, init_cache
from nemojax.checkpoint import load, save
from nemojax.config import CheckpointError, ConfigError, LayerType, NemotronHConfig
from nemojax.generate import ChatSession, Generation, generate
from nemojax.model import NemotronH
from nemojax.prefix_cache import PrefixCache
from nemojax.sampler import Sampler
from nemojax.sampling import SamplingParams
from nemojax.tokenizer import DecodeStream, Tokenizer

try:
  __version__ = importlib.metadata.version("nemojax")  # pyproject.toml is the one source
except importlib.metadata.PackageNotFoundError:  # run from a copied source tree, not installed
  __version__ = "0+unknown"

__all__ = [
    "Cache", "ChatSession", "CheckpointError", "ConfigError", "KVState", "LayerType", "MambaState",
    "NemotronH", "NemotronHConfig", "init_cache", "load", "save", "generate", "Generation",
    "PrefixCache", "Sampler", "SamplingParams", "Tokenizer", "DecodeStream",
]
