"""Nemotron-H configuration.

`NemotronHConfig` is a frozen dataclass whose field names are the keys of a Hugging Face
`config.json`, so a checkpoint's config maps onto it one to one. The layer pattern is parsed once
into a tuple of `LayerType`; derived sizes (`d_inner`, `conv_dim`, ...) are properties.

Pattern letters: ``M`` Mamba-2 mixer, ``*`` attention, ``-`` MLP (``E`` MoE is not supported).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from typing import Any, Mapping


class LayerType(enum.Enum):
  MAMBA = "M"
  ATTENTION = "*"
  MLP = "-"

  @property
  def hf_name(self) -> str:
    return _HF_BLOCK_NAMES[self]


_HF_BLOCK_NAMES = {
    LayerType.MAMBA: "mamba",
    LayerType.ATTENTION: "attention",
    LayerType.MLP: "mlp",
}
# Names used in `layers_block_type` lists by transformers (both generations of spelling).
_BLOCK_NAME_TO_LETTER = {
    "mamba": "M",
    "linear_attention": "M",
    "m": "M",
    "attention": "*",
    "full_attention": "*",
    "*": "*",
    "mlp": "-",
    "-": "-",
    "moe": "E",
    "e": "E",
}

# Aliases accepted by `from_hf_config`: alternative HF spelling -> our field name.
_ALIASES = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_chunk_size": "chunk_size",
    "mamba_d_state": "ssm_state_size",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_dt_limit": "time_step_limit",
    "mamba_expand": "expand",
    "rms_norm_eps": "layer_norm_epsilon",
}


class ConfigError(ValueError):
  """A config that does not describe a valid Nemotron-H model."""


class CheckpointError(ValueError):
  """A checkpoint that is damaged, incomplete, or does not match its config (the message names
  the file or tensor). Defined here, beside ConfigError, so that both the converters (which may
  import only the config) and the loader raise the same type."""


# The dtype policy, written once: these parameters stay float32 whatever the model's dtype, since
# the SSM's decay and skip terms and the norm scales are precision-sensitive (mamba_ssm and vLLM
# do the same). Checked against the last component of a parameter's name (`A_log`) or, for the
# norm scales, the module holding the `weight` (`norm`, `norm_f`).
FLOAT32_PARAMS = frozenset({"A_log", "D", "dt_bias"})
FLOAT32_MODULES = frozenset({"norm", "norm_f"})


def keeps_float32(name: str) -> bool:
  """Whether parameter `name` (an HF name like "backbone.layers.0.mixer.A_log", or its tail) is
  kept in float32 regardless of the model's dtype."""
  parts = name.split(".")
  return parts[-1] in FLOAT32_PARAMS or (
      len(parts) > 1 and parts[-1] == "weight" and parts[-2] in FLOAT32_MODULES)


def _json_float(x, source: str) -> float:
  """Floats as HF writes them: numbers, "inf"/"Infinity" strings, or {"__float__": "Infinity"}."""
  if isinstance(x, dict) and "__float__" in x:
    x = x["__float__"]
  try:
    return float(x)
  except (TypeError, ValueError):
    raise ConfigError(f"{source}: key 'time_step_limit': expected numbers, got {x!r}") from None


@dataclasses.dataclass(frozen=True)
class NemotronHConfig:
  """Hyper-parameters of a Nemotron-H model, named as in the HF `config.json`.

  Attributes:
    vocab_size: number of token embeddings and logits.
    hidden_size: model width D.
    intermediate_size: MLP width F (relu² MLP, no gate).
    num_hidden_layers: number of blocks; must equal len(hybrid_override_pattern).
    hybrid_override_pattern: one letter per block: M (Mamba-2), * (attention), - (MLP).
    num_attention_heads, num_key_value_heads, head_dim: GQA attention sizes.
    mamba_num_heads, mamba_head_dim: H and P; the Mamba inner width is H * P.
    ssm_state_size: N. n_groups: G (B/C groups, shared by H/G consecutive heads).
    conv_kernel: K, the depthwise causal conv width.
    chunk_size: Q, the SSD chunk length.
  """

  vocab_size: int = 131072
  hidden_size: int = 4480
  intermediate_size: int = 15680
  num_hidden_layers: int = 56
  hybrid_override_pattern: str = "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-"
  num_attention_heads: int = 40
  num_key_value_heads: int = 8
  head_dim: int = 128
  mamba_num_heads: int = 128
  mamba_head_dim: int = 80
  ssm_state_size: int = 128
  n_groups: int = 8
  conv_kernel: int = 4
  chunk_size: int = 128
  layer_norm_epsilon: float = 1e-5
  use_conv_bias: bool = True
  use_bias: bool = False
  mlp_bias: bool = False
  attention_bias: bool = False
  mamba_proj_bias: bool = False
  mamba_hidden_act: str = "silu"
  mlp_hidden_act: str = "relu2"
  tie_word_embeddings: bool = False
  residual_in_fp32: bool = False
  time_step_min: float = 0.001
  time_step_max: float = 0.1
  time_step_floor: float = 1e-4
  time_step_limit: tuple[float, float] = (0.0, float("inf"))
  initializer_range: float = 0.02
  max_position_embeddings: int = 131072
  pad_token_id: int | None = 0
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  expand: int = 2  # Present in HF configs; unused (the inner width is mamba_num_heads * mamba_head_dim).

  def __post_init__(self):
    self.validate()

  # ----------------------------------------------------------------------------------------------
  # Validation
  # ----------------------------------------------------------------------------------------------
  def validate(self) -> None:
    def need(cond: bool, key: str, msg: str):
      if not cond:
        raise ConfigError(f"config key {key!r}: {msg}")

    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "mamba_num_heads",
                "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "chunk_size"):
      v = getattr(self, key)
      need(isinstance(v, int) and v > 0, key, f"expected a positive integer, got {v!r}")
    pattern = self.hybrid_override_pattern
    need(isinstance(pattern, str), "hybrid_override_pattern", f"expected a string, got {pattern!r}")
    bad = sorted(set(pattern) - {t.value for t in LayerType})
    need(not bad, "hybrid_override_pattern",
         f"unknown layer letters {bad} in {pattern!r} (expected only 'M', '*', '-'"
         + ("; MoE layers 'E' are not supported" if "E" in bad else "") + ")")
    need(len(pattern) == self.num_hidden_layers, "hybrid_override_pattern",
         f"has {len(pattern)} letters but num_hidden_layers is {self.num_hidden_layers}")
    if LayerType.MAMBA.value in pattern:
      need(self.mamba_num_heads % self.n_groups == 0, "n_groups",
           f"mamba_num_heads ({self.mamba_num_heads}) must be divisible by n_groups ({self.n_groups})")
      need(self.conv_kernel >= 1, "conv_kernel", "must be >= 1")
      need(self.mamba_hidden_act == "silu", "mamba_hidden_act",
           f"only 'silu' is supported, got {self.mamba_hidden_act!r}")
      need(not self.mamba_proj_bias and not self.use_bias, "mamba_proj_bias",
           "Mamba projection biases are not supported (Nemotron-H has none)")
    if LayerType.ATTENTION.value in pattern:
      for key in ("num_attention_heads", "num_key_value_heads", "head_dim"):
        v = getattr(self, key)
        need(isinstance(v, int) and v > 0, key, f"expected a positive integer, got {v!r}")
      need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
           f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
           f"num_key_value_heads ({self.num_key_value_heads})")
      need(not self.attention_bias, "attention_bias", "attention biases are not supported")
    if LayerType.MLP.value in pattern:
      need(isinstance(self.intermediate_size, int) and self.intermediate_size > 0,
           "intermediate_size", f"expected a positive integer, got {self.intermediate_size!r}")
      need(self.mlp_hidden_act == "relu2", "mlp_hidden_act",
           f"only 'relu2' is supported, got {self.mlp_hidden_act!r}")
      need(not self.mlp_bias, "mlp_bias", "MLP biases are not supported")
    need(not self.tie_word_embeddings, "tie_word_embeddings",
         "Nemotron-H has an untied lm_head; tied embeddings are not supported")
    need(self.layer_norm_epsilon > 0, "layer_norm_epsilon", "must be positive")

  # ----------------------------------------------------------------------------------------------
  # Derived sizes
  # ----------------------------------------------------------------------------------------------
  @property
  def layer_types(self) -> tuple[LayerType, ...]:
    return tuple(LayerType(c) for c in self.hybrid_override_pattern)

  @property
  def d_inner(self) -> int:
    """Mamba inner width I = H * P."""
    return self.mamba_num_heads * self.mamba_head_dim

  @property
  def conv_dim(self) -> int:
    """Channels of the depthwise conv: x, B and C."""
    return self.d_inner + 2 * self.n_groups * self.ssm_state_size

  @property
  def in_proj_dim(self) -> int:
    """Output width of in_proj: z, xBC, dt."""
    return self.d_inner + self.conv_dim + self.mamba_num_heads

  @property
  def heads_per_group(self) -> int:
    return self.mamba_num_heads // self.n_groups

  @property
  def num_layers_of(self) -> dict[LayerType, int]:
    return {t: self.layer_types.count(t) for t in LayerType}

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    e = self.eos_token_id
    if e is None:
      return ()
    return tuple(e) if isinstance(e, (tuple, list)) else (int(e),)

  def num_params(self) -> int:
    """Parameter count computed from the config (independently of the modules)."""
    d, v = self.hidden_size, self.vocab_size
    per = {
        LayerType.MAMBA: (self.in_proj_dim * d + self.conv_dim * self.conv_kernel
                          + (self.conv_dim if self.use_conv_bias else 0)
                          + 3 * self.mamba_num_heads + self.d_inner + d * self.d_inner),
        LayerType.ATTENTION: (d * self.num_attention_heads * self.head_dim * 2
                              + d * self.num_key_value_heads * self.head_dim * 2),
        LayerType.MLP: 2 * d * self.intermediate_size,
    }
    total = 2 * v * d + d  # embeddings, lm_head, norm_f
    for t in self.layer_types:
      total += per[t] + d  # mixer + pre-norm
    return total

  # ----------------------------------------------------------------------------------------------
  # HF interop
  # ----------------------------------------------------------------------------------------------
  @classmethod
  def from_hf_config(cls, cfg: Mapping[str, Any], *, source: str = "config") -> "NemotronHConfig":
    """Builds a config from an HF `config.json` dict; accepts both generations of key names.

    Unknown keys are ignored (HF configs carry many that do not affect inference). `source` names
    the file in error messages.
    """
    if not isinstance(cfg, Mapping):
      raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type is not None and model_type != "nemotron_h":
      raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'nemotron_h'")
    fields = {f.name for f in dataclasses.fields(cls)}
    kw: dict[str, Any] = {}
    for key, value in cfg.items():
      name = _ALIASES.get(key, key)
      if name in fields and name not in ("hybrid_override_pattern", "num_hidden_layers"):
        if name in kw and key != name:
          continue  # the canonical spelling wins over an alias
        kw[name] = value
    pattern = cfg.get("hybrid_override_pattern")
    blocks = cfg.get("layers_block_type", cfg.get("layer_types"))
    if pattern is None and blocks is not None:
      if not isinstance(blocks, (list, tuple)):
        raise ConfigError(f"{source}: key 'layers_block_type': expected a list, got {blocks!r}")
      try:
        pattern = "".join(_BLOCK_NAME_TO_LETTER[str(b).lower()] for b in blocks)
      except KeyError as e:
        raise ConfigError(f"{source}: key 'layers_block_type': unknown block type {e.args[0]!r}; "
                          f"expected one of {sorted(_BLOCK_NAME_TO_LETTER)}") from None
    if pattern is None:
      raise ConfigError(f"{source}: needs 'hybrid_override_pattern' or 'layers_block_type'")
    kw["hybrid_override_pattern"] = pattern
    kw["num_hidden_layers"] = cfg.get("num_hidden_layers", len(pattern))
    if kw["num_hidden_layers"] is None:
      kw["num_hidden_layers"] = len(pattern)
    if "time_step_limit" in kw:
      kw["time_step_limit"] = tuple(_json_float(x, source) for x in kw["time_step_limit"])
    if isinstance(kw.get("eos_token_id"), list):
      kw["eos_token_id"] = tuple(kw["eos_token_id"])
    try:
      return cls(**kw)
    except ConfigError as e:
      raise ConfigError(f"{source}: {e}") from None
    except TypeError as e:
      raise ConfigError(f"{source}: {e}") from None

  @classmethod
  def from_json_file(cls, path: str | os.PathLike) -> "NemotronHConfig":
    path = os.fspath(path)
    try:
      with open(path) as f:
        data = json.load(f)
    except FileNotFoundError:
      raise ConfigError(f"{path}: no such file (a Nemotron-H checkpoint needs config.json)") from None
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return cls.from_hf_config(data, source=path)

  def to_hf_config(self) -> dict[str, Any]:
    """An HF `config.json` dict that transformers' NemotronHConfig reads back."""
    d = dataclasses.asdict(self)
    d["time_step_limit"] = list(self.time_step_limit)
    if isinstance(d["eos_token_id"], tuple):
      d["eos_token_id"] = list(d["eos_token_id"])
    d.update(
        model_type="nemotron_h",
        architectures=["NemotronHForCausalLM"],
        mamba_ssm_cache_dtype="float32",
    )
    # Strict JSON has no infinity; transformers writes and reads it as {"__float__": "Infinity"}.
    d["time_step_limit"] = [{"__float__": "Infinity"} if math.isinf(v) else v
                            for v in self.time_step_limit]
    return d

  def replace(self, **kw) -> "NemotronHConfig":
    return dataclasses.replace(self, **kw)

  # ----------------------------------------------------------------------------------------------
  # Presets
  # ----------------------------------------------------------------------------------------------
  @classmethod
  def nano_9b_v2(cls) -> "NemotronHConfig":
    """NVIDIA-Nemotron-Nano-9B-v2 (56 layers, 8,888,227,328 parameters)."""
    return cls()

  @classmethod
  def nano_12b_v2_base(cls) -> "NemotronHConfig":
    """NVIDIA-Nemotron-Nano-12B-v2-Base (62 layers)."""
    return cls(
        hidden_size=5120,
        intermediate_size=20480,
        num_hidden_layers=62,
        hybrid_override_pattern="M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
        num_attention_heads=40,
        num_key_value_heads=8,
        mamba_num_heads=128,
        mamba_head_dim=80,
    )

  @classmethod
  def nemotron_h_8b(cls) -> "NemotronHConfig":
    """Nemotron-H-8B (52 layers, Mamba head dim 64)."""
    return cls(
        hidden_size=4096,
        intermediate_size=21504,
        num_hidden_layers=52,
        hybrid_override_pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
        num_attention_heads=32,
        num_key_value_heads=8,
        mamba_num_heads=128,
        mamba_head_dim=64,
        max_position_embeddings=8192,
    )

  @classmethod
  def tiny(cls, **overrides) -> "NemotronHConfig":
    """A few-hundred-thousand-parameter model with all three layer types, for tests.

    Head dim and state size are deliberately not powers of two.
    """
    kw = dict(
        vocab_size=256,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=6,
        hybrid_override_pattern="M-M*-M",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        mamba_num_heads=6,
        mamba_head_dim=10,
        ssm_state_size=12,
        n_groups=2,
        conv_kernel=4,
        chunk_size=8,
        max_position_embeddings=4096,
    )
    kw.update(overrides)
    if "hybrid_override_pattern" in overrides and "num_hidden_layers" not in overrides:
      kw["num_hidden_layers"] = len(overrides["hybrid_override_pattern"])
    return cls(**kw)
