"""Nemotron-H configuration.

`NemotronHConfig` is a frozen dataclass whose field names are the keys of a Hugging Face
`config.json`, so a checkpoint's config maps onto it one to one. The layer pattern is parsed once
into a tuple of `LayerType`; derived sizes (`d_inner`, `conv_dim`, ...) are properties.

Pattern letters: ``M`` Mamba-2 mixer, ``*`` attention, ``-`` MLP, ``E`` mixture of experts
(Nemotron 3; see `nemojax/moe.py`). Multi-token-prediction layers (`num_nextn_predict_layers`,
`mtp.*` tensors) are read and ignored, as transformers 5.17 does.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from typing import Any
from collections.abc import Mapping


class LayerType(enum.Enum):
  MAMBA = "M"
  ATTENTION = "*"
  MLP = "-"
  MOE = "E"

  @property
  def hf_name(self) -> str:
    return _HF_BLOCK_NAMES[self]


_HF_BLOCK_NAMES = {
    LayerType.MAMBA: "mamba",
    LayerType.ATTENTION: "attention",
    LayerType.MLP: "mlp",
    LayerType.MOE: "moe",
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
    "num_local_experts": "n_routed_experts",  # transformers' attribute_map
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
# The router of an MoE layer (`gate`) stays float32 too, so the choice of experts does not depend
# on the model's dtype.
FLOAT32_PARAMS = frozenset({"A_log", "D", "dt_bias", "e_score_correction_bias"})
FLOAT32_MODULES = frozenset({"norm", "norm_f", "gate"})


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
    n_routed_experts, num_experts_per_tok: E routed experts per MoE layer, k chosen per token.
    moe_intermediate_size: width of each routed expert (relu², no gate).
    n_shared_experts, moe_shared_expert_intermediate_size: the always-on shared expert; like
      transformers, one MLP of the given width whatever n_shared_experts (>= 1) says.
    moe_latent_size: LatentMoE width L: routed experts work on fc1_latent_proj(x) [L] and their sum
      goes back through fc2_latent_proj; None means experts work at hidden_size.
    routed_scaling_factor, norm_topk_prob, n_group, topk_group: the router (see `moe.py`).
    num_nextn_predict_layers: MTP layers of the checkpoint; accepted and ignored.
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
  expand: int = 2  # In HF configs; unused (the inner width is mamba_num_heads * mamba_head_dim).
  # Mixture of experts ('E' layers); defaults are transformers' NemotronHConfig defaults.
  n_routed_experts: int = 8
  n_shared_experts: int = 1
  moe_intermediate_size: int = 7688
  moe_shared_expert_intermediate_size: int = 7688
  moe_latent_size: int | None = None
  num_experts_per_tok: int = 2
  routed_scaling_factor: float = 1.0
  n_group: int = 1
  topk_group: int = 1
  norm_topk_prob: bool = True
  num_nextn_predict_layers: int = 0  # MTP: read and ignored (transformers 5.17 ignores mtp.*)

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
         f"unknown layer letters {bad} in {pattern!r} (expected only 'M', '*', '-', 'E')")
    need(len(pattern) == self.num_hidden_layers, "hybrid_override_pattern",
         f"has {len(pattern)} letters but num_hidden_layers is {self.num_hidden_layers}")
    if LayerType.MAMBA.value in pattern:
      need(self.mamba_num_heads % self.n_groups == 0, "n_groups",
           f"mamba_num_heads ({self.mamba_num_heads}) must be divisible by n_groups "
           f"({self.n_groups})")
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
    if LayerType.MOE.value in pattern:
      self._validate_moe(need)
    nextn = self.num_nextn_predict_layers
    need(isinstance(nextn, int) and nextn >= 0, "num_nextn_predict_layers",
         f"expected a non-negative integer, got {nextn!r}")
    need(not self.tie_word_embeddings, "tie_word_embeddings",
         "Nemotron-H has an untied lm_head; tied embeddings are not supported")
    need(self.layer_norm_epsilon > 0, "layer_norm_epsilon", "must be positive")

  def _validate_moe(self, need) -> None:
    for key in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                "moe_shared_expert_intermediate_size", "n_group", "topk_group"):
      v = getattr(self, key)
      need(isinstance(v, int) and not isinstance(v, bool) and v > 0, key,
           f"expected a positive integer, got {v!r}")
    e, k = self.n_routed_experts, self.num_experts_per_tok
    need(isinstance(self.n_shared_experts, int) and self.n_shared_experts >= 1, "n_shared_experts",
         f"expected an integer >= 1 (transformers always builds one shared expert), "
         f"got {self.n_shared_experts!r}")
    latent = self.moe_latent_size
    need(latent is None or (isinstance(latent, int) and latent > 0), "moe_latent_size",
         f"expected null or a positive integer, got {latent!r}")
    need(k <= e, "num_experts_per_tok",
         f"{k} experts per token but only n_routed_experts={e} experts")
    need(e % self.n_group == 0, "n_group",
         f"n_routed_experts ({e}) must be divisible by n_group ({self.n_group})")
    need(self.topk_group <= self.n_group, "topk_group",
         f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
    per_group = e // self.n_group
    # A group's score is the sum of its two best experts (transformers' router).
    need(self.n_group == 1 or per_group >= 2, "n_group",
         f"groups need at least 2 experts each, got {per_group} ({e} experts / {self.n_group})")
    need(k <= self.topk_group * per_group, "num_experts_per_tok",
         f"{k} experts per token but topk_group={self.topk_group} groups of {per_group} "
         f"offer only {self.topk_group * per_group}")
    s = self.routed_scaling_factor
    need(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s),
         "routed_scaling_factor", f"expected a finite number, got {s!r}")
    need(isinstance(self.norm_topk_prob, bool), "norm_topk_prob",
         f"expected true or false, got {self.norm_topk_prob!r}")
    need(self.mlp_hidden_act == "relu2", "mlp_hidden_act",
         f"experts use mlp_hidden_act; only 'relu2' is supported, got {self.mlp_hidden_act!r}")
    need(not self.mlp_bias, "mlp_bias", "expert and latent-projection biases are not supported")

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

  @property
  def moe_expert_dim(self) -> int:
    """Width the routed experts read and write: moe_latent_size (LatentMoE) or hidden_size."""
    return self.moe_latent_size if self.moe_latent_size is not None else self.hidden_size

  def num_params(self, active: bool = False) -> int:
    """Parameter count computed from the config (independently of the modules).

    Counts what torch's `model.parameters()` counts: the router's `e_score_correction_bias` is a
    buffer, not a parameter. `active=True` counts each MoE layer's routed experts as
    `num_experts_per_tok` of them (the weights one token's forward pass touches); embeddings and
    the LM head count in both.
    """
    d, v = self.hidden_size, self.vocab_size
    routed = self.num_experts_per_tok if active else self.n_routed_experts
    moe = (self.n_routed_experts * d  # router
           + routed * 2 * self.moe_expert_dim * self.moe_intermediate_size
           + 2 * d * self.moe_shared_expert_intermediate_size
           + (2 * d * self.moe_latent_size if self.moe_latent_size is not None else 0))
    per = {
        LayerType.MAMBA: (self.in_proj_dim * d + self.conv_dim * self.conv_kernel
                          + (self.conv_dim if self.use_conv_bias else 0)
                          + 3 * self.mamba_num_heads + self.d_inner + d * self.d_inner),
        LayerType.ATTENTION: (d * self.num_attention_heads * self.head_dim * 2
                              + d * self.num_key_value_heads * self.head_dim * 2),
        LayerType.MLP: 2 * d * self.intermediate_size,
        LayerType.MOE: moe,
    }
    total = 2 * v * d + d  # embeddings, lm_head, norm_f
    for t in self.layer_types:
      total += per[t] + d  # mixer + pre-norm
    return total

  # ----------------------------------------------------------------------------------------------
  # HF interop
  # ----------------------------------------------------------------------------------------------
  @classmethod
  def from_hf_config(cls, cfg: Mapping[str, Any], *, source: str = "config") -> NemotronHConfig:
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
  def from_json_file(cls, path: str | os.PathLike) -> NemotronHConfig:
    path = os.fspath(path)
    try:
      with open(path) as f:
        data = json.load(f)
    except FileNotFoundError:
      raise ConfigError(
          f"{path}: no such file (a Nemotron-H checkpoint needs config.json)") from None
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

  def replace(self, **kw) -> NemotronHConfig:
    return dataclasses.replace(self, **kw)

  # ----------------------------------------------------------------------------------------------
  # Presets
  # ----------------------------------------------------------------------------------------------
  @classmethod
  def nano_9b_v2(cls) -> NemotronHConfig:
    """NVIDIA-Nemotron-Nano-9B-v2 (56 layers, 8,888,227,328 parameters)."""
    return cls()

  @classmethod
  def nano_12b_v2_base(cls) -> NemotronHConfig:
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
  def nemotron_h_8b(cls) -> NemotronHConfig:
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
  def nemotron_3_nano_30b_a3b(cls) -> NemotronHConfig:
    """NVIDIA-Nemotron-3-Nano-30B-A3B: 52 layers (23 Mamba-2, 23 MoE, 6 attention), 128 routed
    experts + 1 shared, top-6; 31,577,937,344 parameters, 3,580,073,408 active.

    Sources: the model's config.json (transformers_version 4.55.4) as quoted in
    jax-ml/jax-llm-examples `nemotron3/` tests (`NEMOTRON3_30B_JSON`; a copy is
    tests/data/nemotron3_nano_30b_a3b_config.json, checked field by field by
    tests/test_moe_presets.py) and NVIDIA Megatron-Bridge `models/nemotronh/nemotron_h_provider.py`
    (`Nemotron3NanoProvider`: topk 6, scaling 2.5, shared width 3712 = 2 x 1856).
    """
    return cls(
        hidden_size=2688,
        intermediate_size=1856,
        num_hidden_layers=52,
        hybrid_override_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=128,
        mamba_num_heads=64,
        mamba_head_dim=64,
        max_position_embeddings=262144,
        n_routed_experts=128,
        n_shared_experts=1,
        moe_intermediate_size=1856,
        moe_shared_expert_intermediate_size=3712,
        num_experts_per_tok=6,
        routed_scaling_factor=2.5,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
    )

  @classmethod
  def nemotron_3_super_120b_a12b(cls) -> NemotronHConfig:
    """NVIDIA-Nemotron-3-Super-120B-A12B: 88 layers (40 Mamba-2, 40 LatentMoE, 8 attention), 512
    routed experts in a 1024-wide latent space + 1 shared, top-22; 120,668,687,360 parameters,
    12,770,216,960 active.

    Sources: NVIDIA Megatron-Bridge `models/nemotronh/nemotron_h_provider.py`
    (`Nemotron3SuperProvider`) and its NemotronHBridge unit tests (512 experts, top-22, 2688 wide,
    latent 1024, shared 5376, scaling 5.0, MTP pattern "*E"); the 88-layer pattern as public
    Megatron launch scripts for Super give it (`--hybrid-override-pattern`); vocabulary 131072,
    one MTP layer (`num_nextn_predict_layers`, read and ignored) and eos_token_id [2, 11] as
    public loaders of the released checkpoints assert them. The full released config.json was
    not found in public sources: load the checkpoint's config.json rather than relying on this
    preset for real weights.
    """
    return cls(
        hidden_size=4096,
        intermediate_size=2688,
        num_hidden_layers=88,
        hybrid_override_pattern=("MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*"
                                 "EMEMEMEMEM*EMEMEMEM*EMEMEMEME"),
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=128,
        mamba_num_heads=128,
        mamba_head_dim=64,
        max_position_embeddings=262144,
        n_routed_experts=512,
        n_shared_experts=1,
        moe_intermediate_size=2688,
        moe_shared_expert_intermediate_size=5376,
        moe_latent_size=1024,
        num_experts_per_tok=22,
        routed_scaling_factor=5.0,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        num_nextn_predict_layers=1,
        eos_token_id=(2, 11),
    )

  @classmethod
  def tiny(cls, **overrides) -> NemotronHConfig:
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
