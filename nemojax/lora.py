"""Low-rank adapters (LoRA) on the projections of a Nemotron-H model, with Flax NNX's `nnx.LoRA`.

A projection y = x · Wᵀ (W [out, in], HF layout) becomes

    y = x · Wᵀ + (x · A) · B                 # A [in, r], B [r, out], r = rank ≪ in, out

with W frozen in the model's dtype (bf16) and A, B trainable `nnx.LoRAParam`s in float32. B starts
at zero, so an adapted model computes exactly what the base model does until the first update.
`nnx.LoRA` has no α/r output factor: with Adam the adapter's step size is set by the learning rate
alone, which is what α/r would otherwise retune.

`apply_lora` wraps chosen projections in place: `mixer.in_proj` becomes `nnx.LoRA(base_module=
in_proj)`, so its base weight lives at `mixer.in_proj.base_module.weight` and its adapter at
`mixer.in_proj.lora_a` / `lora_b`. Train only the adapters by giving the trainer the filter
`nnx.LoRAParam` (every other parameter then stays a constant input of the step). `merge_lora`
folds each adapter into its base weight, W ← W + (A · B)ᵀ computed in float32, and puts the plain
projection back, so the merged model has the original structure and `nemojax.save` writes it as
any other checkpoint.

Example:
  model = nemojax.load(path)                               # bf16 base
  apply_lora(model, rank=16)                               # Mamba in/out, q/k/v/o, MLP up/down
  trainer = Trainer(model, TrainConfig(...), wrt=nnx.LoRAParam)
  ...
  merged = merge_lora(trainer.model(state))
  nemojax.save(merged, "out/")
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.layers import Linear

__all__ = ["DEFAULT_TARGETS", "LORA_PARAM", "apply_lora", "lora_targets", "merge_lora"]

f32 = jnp.float32
# Every projection of a block: Mamba in/out, attention q/k/v/o, MLP up/down.
DEFAULT_TARGETS = ("in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                   "down_proj")
LORA_PARAM = nnx.LoRAParam  # the filter of the trainable adapter parameters


def _block_modules(model: nnx.Module):
  """The modules below `model.backbone.layers`, the only place adapters go (not the LM head)."""
  for _, module in nnx.iter_modules(model.backbone.layers):
    yield module


def lora_targets(model: nnx.Module) -> set[str]:
  """The projection names inside the model's blocks that `apply_lora` can adapt."""
  return {name for module in _block_modules(model) for name, value in vars(module).items()
          if isinstance(value, Linear)}


def apply_lora(model: nnx.Module, rank: int, *, targets: Iterable[str] | None = None,
               rngs: nnx.Rngs | None = None, param_dtype=f32) -> nnx.Module:
  """Wraps the named projections of every block in an `nnx.LoRA` adapter, in place.

  Args:
    model: A `NemotronH` (or any module with `backbone.layers` of blocks holding `Linear`s).
    rank: The adapters' rank r.
    targets: Attribute names of the projections to adapt; a name a block lacks is skipped there.
      None: those of `DEFAULT_TARGETS` the model has (an all-Mamba model has no q_proj).
    rngs: Initialises A (He-uniform); B starts at zero. Default `nnx.Rngs(0)`.
    param_dtype: Storage dtype of A and B (float32: they are what the optimizer updates).

  Returns:
    `model`, now holding adapters.

  Raises:
    ValueError: `rank` is not positive, or a target names no projection of any block.
  """
  targets = (tuple(sorted(set(DEFAULT_TARGETS) & lora_targets(model))) if targets is None
             else tuple(targets))
  if int(rank) <= 0:
    raise ValueError(f"apply_lora: rank must be a positive integer, got {rank!r}")
  unknown = sorted(set(targets) - lora_targets(model))
  if unknown:
    raise ValueError(f"apply_lora: targets {unknown} name no projection of the model's blocks; "
                     f"expected some of {sorted(lora_targets(model))}")
  rngs = rngs if rngs is not None else nnx.Rngs(0)
  dtype = getattr(model, "dtype", None)
  swaps = [(module, name, value) for module in _block_modules(model)
           for name, value in vars(module).items() if name in targets and isinstance(value, Linear)]
  for module, name, base in swaps:
    out_features, in_features = base.weight.shape
    # dtype: the adapter path runs in the activations' dtype, so adding it to the base output
    # keeps that output's dtype (bf16, or float32 where the caller asks for float32).
    setattr(module, name, nnx.LoRA(in_features, int(rank), out_features, base_module=base,
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs))
  return model


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its base weight, W ← W + (A · B)ᵀ, and removes it, in place.

  The sum is formed in float32 and rounded once to the base weight's dtype.

  Returns:
    `model`, with the structure it had before `apply_lora`.
  """
  swaps = [(module, name, value) for module in _block_modules(model)
           for name, value in vars(module).items()
           if isinstance(value, nnx.LoRA) and isinstance(value.base_module, Linear)]
  for module, name, lora in swaps:
    base = lora.base_module
    w = base.weight[...]
    delta = jnp.einsum("ir,ro->oi", lora.lora_a[...].astype(f32), lora.lora_b[...].astype(f32),
                       precision=jax.lax.Precision.HIGHEST)
    # A new Param, not an in-place write: the old Variable may be shared with a trainer's state.
    base.weight = nnx.Param((w.astype(f32) + delta).astype(w.dtype))
    setattr(module, name, base)
  return model
