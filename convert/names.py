"""The one table between HF checkpoint names and nemojax module paths.

Every tensor of an HF Nemotron-H checkpoint is listed here with the module path it fills, the
shape the config implies and whether nemojax keeps it in float32 (the policy is
`config.keeps_float32`). Module attribute names mirror the HF names, so the path is the name split
at dots (layer indices as ints); the table exists so that loading, converting and exporting agree
on one list and can validate before touching data. `lookup`/`assign` are the one walk over a
parameter path in a nested dict (`nnx.to_pure_dict` or an orbax tree).

MoE layers: the checkpoint holds one tensor per routed expert (`mixer.experts.{j}.up_proj.weight`
[f, L]); nemojax stacks them per layer (`experts.up_proj` [E, f, L], transformers' in-memory
layout). Such a spec's path ends in the expert index j: it fills slice j of the stacked parameter
at `path[:-1]` (`is_stacked`). Tensors of multi-token-prediction layers (`mtp.*`) are not used by
nemojax (nor by transformers 5.17) and are skipped (`is_ignored`).
"""

from __future__ import annotations

import dataclasses
from typing import Any
from collections.abc import Callable, Iterator

import numpy as np

from nemojax.config import LayerType, NemotronHConfig, keeps_float32

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One checkpoint tensor: HF name, nemojax state path, expected shape, storage policy."""

  hf_name: str
  path: tuple[str | int, ...]
  shape: Shape
  float32: bool  # kept in float32 regardless of the model dtype (norm scales, A_log, D, dt_bias)

  def storage_dtype(self, dtype) -> np.dtype:
    """This tensor's dtype in a model of `dtype` (float32 for the kept-in-float32 ones)."""
    return np.dtype(np.float32) if self.float32 else np.dtype(dtype)


def _spec(name: str, shape: Shape) -> TensorSpec:
  return TensorSpec(name, _path(name), shape, keeps_float32(name))


# (suffix under `backbone.layers.{i}.`, shape from config)
_Entry = tuple[str, Callable[[NemotronHConfig], Shape]]

_LAYER_TABLE: dict[LayerType, list[_Entry]] = {
    LayerType.MAMBA: [
        ("mixer.in_proj.weight", lambda c: (c.in_proj_dim, c.hidden_size)),
        ("mixer.conv1d.weight", lambda c: (c.conv_dim, 1, c.conv_kernel)),
        ("mixer.conv1d.bias", lambda c: (c.conv_dim,)),
        ("mixer.A_log", lambda c: (c.mamba_num_heads,)),
        ("mixer.D", lambda c: (c.mamba_num_heads,)),
        ("mixer.dt_bias", lambda c: (c.mamba_num_heads,)),
        ("mixer.norm.weight", lambda c: (c.d_inner,)),
        ("mixer.out_proj.weight", lambda c: (c.hidden_size, c.d_inner)),
    ],
    LayerType.ATTENTION: [
        ("mixer.q_proj.weight", lambda c: (c.num_attention_heads * c.head_dim, c.hidden_size)),
        ("mixer.k_proj.weight", lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size)),
        ("mixer.v_proj.weight", lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size)),
        ("mixer.o_proj.weight", lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim)),
    ],
    LayerType.MLP: [
        ("mixer.up_proj.weight", lambda c: (c.intermediate_size, c.hidden_size)),
        ("mixer.down_proj.weight", lambda c: (c.hidden_size, c.intermediate_size)),
    ],
    LayerType.MOE: [  # the router (`gate`) is float32: see config.keeps_float32
        ("mixer.gate.weight", lambda c: (c.n_routed_experts, c.hidden_size)),
        ("mixer.gate.e_score_correction_bias", lambda c: (c.n_routed_experts,)),
        ("mixer.shared_experts.up_proj.weight",
         lambda c: (c.moe_shared_expert_intermediate_size, c.hidden_size)),
        ("mixer.shared_experts.down_proj.weight",
         lambda c: (c.hidden_size, c.moe_shared_expert_intermediate_size)),
        ("mixer.fc1_latent_proj.weight", lambda c: (c.moe_latent_size, c.hidden_size)),
        ("mixer.fc2_latent_proj.weight", lambda c: (c.hidden_size, c.moe_latent_size)),
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


def is_stacked(spec: TensorSpec) -> bool:
  """Whether `spec` fills one slice (`spec.path[-1]`) of a stacked parameter (`spec.path[:-1]`)."""
  return isinstance(spec.path[-1], int)


def _path(name: str) -> tuple[str | int, ...]:
  return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def tensor_specs(config: NemotronHConfig) -> list[TensorSpec]:
  """All tensors of an HF checkpoint for `config`, in model order."""
  specs = [_spec("backbone.embeddings.weight", (config.vocab_size, config.hidden_size))]
  for i, t in enumerate(config.layer_types):
    specs.append(_spec(f"backbone.layers.{i}.norm.weight", (config.hidden_size,)))
    for suffix, shape_fn in _LAYER_TABLE[t]:
      if suffix == "mixer.conv1d.bias" and not config.use_conv_bias:
        continue
      if "latent_proj" in suffix and config.moe_latent_size is None:
        continue
      specs.append(_spec(f"backbone.layers.{i}.{suffix}", shape_fn(config)))
    if t is LayerType.MOE:
      for proj, shape_fn in _EXPERT_TABLE:
        stacked = _path(f"backbone.layers.{i}.mixer.experts.{proj}")
        specs.extend(
            TensorSpec(f"backbone.layers.{i}.mixer.experts.{j}.{proj}.weight", stacked + (j,),
                       shape_fn(config), False) for j in range(config.n_routed_experts))
  specs.append(_spec("backbone.norm_f.weight", (config.hidden_size,)))
  specs.append(_spec("lm_head.weight", (config.vocab_size, config.hidden_size)))
  return specs


def lookup(tree: dict, path: tuple) -> Any:
  """The leaf at `path` in a nested dict, or None where the path does not exist.

  A trailing integer past an array leaf selects that slice of a stacked parameter (`is_stacked`).
  """
  for key in path:
    if isinstance(tree, dict):
      if key not in tree:
        return None
      tree = tree[key]
    elif isinstance(key, int) and 0 <= key < getattr(tree, "shape", (0,))[0]:
      tree = tree[key]
    else:
      return None
  return tree


def assign(tree: dict, path: tuple, value: Any) -> None:
  """Sets the leaf at `path` in a nested dict, creating the dicts on the way."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def model_tensors(pure: dict, config: NemotronHConfig) -> Iterator[tuple[TensorSpec, Any]]:
  """(spec, leaf) for every checkpoint tensor of a model's `nnx.to_pure_dict` state, model order.

  Raises:
    ValueError: a tensor is missing from the state or has another shape than the config implies.
  """
  for spec in tensor_specs(config):
    leaf = lookup(pure, spec.path)
    if leaf is None or tuple(leaf.shape) != spec.shape:
      got = "missing" if leaf is None else f"of shape {tuple(leaf.shape)}"
      raise ValueError(f"model parameter {spec.hf_name!r} is {got}, the config implies "
                       f"{spec.shape}")
    yield spec, leaf
