"""The one table between HF checkpoint names and nemojax module paths.

Every tensor of an HF Nemotron-H checkpoint is listed here with the module path it fills, the
shape the config implies and whether nemojax keeps it in float32. Module attribute names mirror
the HF names, so the path is the name split at dots (layer indices as ints); the table exists so
that loading, converting and exporting agree on one list and can validate before touching data.

MoE layers: the checkpoint holds one tensor per routed expert (`mixer.experts.{j}.up_proj.weight`
[f, L]); nemojax stacks them per layer (`experts.up_proj` [E, f, L], transformers' in-memory
layout). Such a spec's path ends in the expert index j: it fills slice j of the stacked parameter
at `path[:-1]` (`is_stacked`). Tensors of multi-token-prediction layers (`mtp.*`) are not used by
nemojax (nor by transformers 5.17) and are skipped (`is_ignored`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from nemojax.config import LayerType, NemotronHConfig

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One checkpoint tensor: HF name, nemojax state path, expected shape, storage policy."""

  hf_name: str
  path: tuple[str | int, ...]
  shape: Shape
  float32: bool  # kept in float32 regardless of the model dtype (norm scales, A_log, D, dt_bias)


# (suffix under `backbone.layers.{i}.`, shape from config, float32?)
_Entry = tuple[str, Callable[[NemotronHConfig], Shape], bool]

_LAYER_TABLE: dict[LayerType, list[_Entry]] = {
    LayerType.MAMBA: [
        ("mixer.in_proj.weight", lambda c: (c.in_proj_dim, c.hidden_size), False),
        ("mixer.conv1d.weight", lambda c: (c.conv_dim, 1, c.conv_kernel), False),
        ("mixer.conv1d.bias", lambda c: (c.conv_dim,), False),
        ("mixer.A_log", lambda c: (c.mamba_num_heads,), True),
        ("mixer.D", lambda c: (c.mamba_num_heads,), True),
        ("mixer.dt_bias", lambda c: (c.mamba_num_heads,), True),
        ("mixer.norm.weight", lambda c: (c.d_inner,), True),
        ("mixer.out_proj.weight", lambda c: (c.hidden_size, c.d_inner), False),
    ],
    LayerType.ATTENTION: [
        ("mixer.q_proj.weight", lambda c: (c.num_attention_heads * c.head_dim, c.hidden_size), False),
        ("mixer.k_proj.weight", lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size), False),
        ("mixer.v_proj.weight", lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size), False),
        ("mixer.o_proj.weight", lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim), False),
    ],
    LayerType.MLP: [
        ("mixer.up_proj.weight", lambda c: (c.intermediate_size, c.hidden_size), False),
        ("mixer.down_proj.weight", lambda c: (c.hidden_size, c.intermediate_size), False),
    ],
    LayerType.MOE: [  # the router stays float32 so the choice of experts is dtype-independent
        ("mixer.gate.weight", lambda c: (c.n_routed_experts, c.hidden_size), True),
        ("mixer.gate.e_score_correction_bias", lambda c: (c.n_routed_experts,), True),
        ("mixer.shared_experts.up_proj.weight",
         lambda c: (c.moe_shared_expert_intermediate_size, c.hidden_size), False),
        ("mixer.shared_experts.down_proj.weight",
         lambda c: (c.hidden_size, c.moe_shared_expert_intermediate_size), False),
        ("mixer.fc1_latent_proj.weight", lambda c: (c.moe_latent_size, c.hidden_size), False),
        ("mixer.fc2_latent_proj.weight", lambda c: (c.hidden_size, c.moe_latent_size), False),
    ],
}
# Per-expert tensors of an MoE layer: (projection, shape of one expert's matrix).
_EXPERT_TABLE = [
    ("up_proj", lambda c: (c.moe_intermediate_size, c.moe_expert_dim)),
    ("down_proj", lambda c: (c.moe_expert_dim, c.moe_intermediate_size)),
]
IGNORED_PREFIXES = ("mtp.",)  # multi-token-prediction layers: not part of the forward pass


def is_ignored(hf_name: str) -> bool:
  """Whether a checkpoint tensor is deliberately not loaded (MTP layers)."""
  return hf_name.startswith(IGNORED_PREFIXES)


def is_stacked(spec: "TensorSpec") -> bool:
  """Whether `spec` fills one slice (`spec.path[-1]`) of a stacked parameter (`spec.path[:-1]`)."""
  return isinstance(spec.path[-1], int)


def _path(name: str) -> tuple[str | int, ...]:
  return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def tensor_specs(config: NemotronHConfig) -> list[TensorSpec]:
  """All tensors of an HF checkpoint for `config`, in model order."""
  specs = [TensorSpec("backbone.embeddings.weight", _path("backbone.embeddings.weight"),
                      (config.vocab_size, config.hidden_size), False)]
  for i, t in enumerate(config.layer_types):
    name = f"backbone.layers.{i}.norm.weight"
    specs.append(TensorSpec(name, _path(name), (config.hidden_size,), True))
    for suffix, shape_fn, keep_f32 in _LAYER_TABLE[t]:
      if suffix == "mixer.conv1d.bias" and not config.use_conv_bias:
        continue
      if "latent_proj" in suffix and config.moe_latent_size is None:
        continue
      name = f"backbone.layers.{i}.{suffix}"
      specs.append(TensorSpec(name, _path(name), shape_fn(config), keep_f32))
    if t is LayerType.MOE:
      for proj, shape_fn in _EXPERT_TABLE:
        stacked = _path(f"backbone.layers.{i}.mixer.experts.{proj}")
        specs.extend(
            TensorSpec(f"backbone.layers.{i}.mixer.experts.{j}.{proj}.weight", stacked + (j,),
                       shape_fn(config), False) for j in range(config.n_routed_experts))
  specs.append(TensorSpec("backbone.norm_f.weight", _path("backbone.norm_f.weight"),
                          (config.hidden_size,), True))
  specs.append(TensorSpec("lm_head.weight", _path("lm_head.weight"),
                          (config.vocab_size, config.hidden_size), False))
  return specs
