"""Helpers for tests and notebooks: tiny random HF reference models and their checkpoints.

Needs the test extras (torch, transformers); imported lazily so the package itself never needs
them. Weights are drawn with scales that keep activations O(1) through the stack, so comparisons
exercise every path (the HF initialiser's std 0.02 would leave most of it near zero).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

from nemojax.config import NemotronHConfig

# Tiny configurations the tests share: all three layer types, n_groups > 1, head dims and states
# that are not powers of two; "odd" also starts with attention and uses 3 groups of 3 heads.
CONFIGS = {
    "tiny": NemotronHConfig.tiny(),
    "odd": NemotronHConfig.tiny(
        hybrid_override_pattern="*M-MM-*M", hidden_size=36, intermediate_size=52,
        num_attention_heads=6, num_key_value_heads=3, head_dim=20, mamba_num_heads=9,
        mamba_head_dim=6, ssm_state_size=7, n_groups=3, chunk_size=16, vocab_size=199),
}

# Tiny MoE configurations (kept apart from CONFIGS, whose tests expect three layer types):
# "moe" has all four layer types, 8 experts, top-2, renormalised, scaled; "latent" is LatentMoE
# with grouped top-k (4 groups, best 2) and no renormalisation.
MOE_CONFIGS = {
    "moe": NemotronHConfig.tiny(
        hybrid_override_pattern="MEM*E-E", n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=20, moe_shared_expert_intermediate_size=28,
        routed_scaling_factor=2.5, norm_topk_prob=True),
    "latent": NemotronHConfig.tiny(
        hybrid_override_pattern="E*MEME", n_routed_experts=12, num_experts_per_tok=3,
        moe_intermediate_size=18, moe_shared_expert_intermediate_size=30, moe_latent_size=20,
        n_group=4, topk_group=2, routed_scaling_factor=1.5, norm_topk_prob=False),
}

# The project's tolerances, one table per dtype, as ‖actual − expected‖ / ‖expected‖ (`rel_err`).
# Rows say what is compared:
#   "same"        the same math computed in another order (chunked vs scan, cache vs full
#                 forward, batched vs alone, sharded vs unsharded): rounding only.
#   "independent" an independent implementation of the same function (transformers' PyTorch
#                 model, the reference VJP against a kernel's backward).
#   "kernel"      a kernel with bf16 operands and fp32 accumulation against an fp32 reference.
#   "model"       a whole bf16 model against the same model in fp32 (errors compound per layer).
TOLERANCES = {
    "float32": {"same": 1e-5, "independent": 1e-4},
    "bfloat16": {"kernel": 1e-2, "model": 3e-2},
}
# The float32 "independent" and bfloat16 "model" rows, by dtype name (older spelling).
RTOL = {"float32": TOLERANCES["float32"]["independent"],
        "bfloat16": TOLERANCES["bfloat16"]["model"]}


def rel_err(a, b) -> float:
  """‖a − b‖ / ‖b‖ in float64; NaN anywhere gives NaN, which fails every `<=` test."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"rel_err: shapes differ, {a.shape} vs {b.shape}")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def tolerance(dtype: str, kind: str) -> float:
  """The table's entry, e.g. `tolerance("float32", "same")`."""
  try:
    return TOLERANCES[str(dtype)][kind]
  except KeyError:
    raise KeyError(f"no tolerance for dtype={dtype!r}, kind={kind!r}; "
                   f"the table has {TOLERANCES}") from None


def assert_close(actual, expected, dtype: str, kind: str, what: str = "") -> None:
  """Asserts rel_err(actual, expected) <= tolerance(dtype, kind); the message gives both."""
  tol = tolerance(dtype, kind)
  err = rel_err(actual, expected)
  assert err <= tol, f"{what or 'value'}: relative error {err:.3e} > {tol:.0e} ({dtype}, {kind})"


def hf_config(config: NemotronHConfig):
  """transformers' NemotronHConfig for our config (pattern spelled the old way on purpose)."""
  from transformers import NemotronHConfig as HFConfig  # noqa: PLC0415
  kw = config.to_hf_config()
  for k in ("model_type", "architectures", "num_hidden_layers"):
    kw.pop(k, None)
  kw["time_step_limit"] = tuple(config.time_step_limit)
  kw["use_mamba_kernels"] = False
  kw["experts_implementation"] = "eager"  # the per-expert loop; grouped_mm needs aligned shapes
  return HFConfig(**kw)


def randomize_(model, seed: int = 0) -> None:
  """Re-draws every parameter of an HF NemotronH model in place with O(1)-preserving scales."""
  import torch  # noqa: PLC0415
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      shape = p.shape
      if name.endswith("A_log"):
        new = torch.log(torch.rand(shape, generator=g) * 4 + 0.5)
      elif name.endswith(".D"):
        new = torch.randn(shape, generator=g)
      elif name.endswith("dt_bias"):
        new = torch.randn(shape, generator=g) - 1.0
      elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
        new = 1.0 + 0.2 * torch.randn(shape, generator=g)
      elif "conv1d" in name:
        new = torch.randn(shape, generator=g) * 0.5
      elif "embeddings" in name:
        new = torch.randn(shape, generator=g)
      else:  # linear [out, in]
        new = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
      p.copy_(new.to(p.dtype))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):  # so choice and weights use different scores
        b.copy_((0.3 * torch.randn(b.shape, generator=g)).to(b.dtype))


def make_hf_model(config: NemotronHConfig, seed: int = 0):
  """A randomly initialised transformers NemotronHForCausalLM in float32, in eval mode, with the
  SPEC's dt limit (0, inf) on every Mamba mixer."""
  import torch  # noqa: PLC0415
  from transformers import NemotronHForCausalLM  # noqa: PLC0415
  torch.manual_seed(seed)
  model = NemotronHForCausalLM(hf_config(config)).float().eval()
  randomize_(model, seed)
  unclamp_dt_(model)
  return model


def unclamp_dt_(model) -> None:
  """HF clamps dt >= time_step_min in prefill; NVIDIA's code and nemojax apply no lower clamp."""
  for module in model.modules():
    if hasattr(module, "time_step_limit"):
      module.time_step_limit = (0.0, float("inf"))


def save_hf(model, path: str | os.PathLike, max_shard_size: str | int | None = None) -> str:
  """Writes a real HF checkpoint directory with `save_pretrained`."""
  kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(os.fspath(path), **kw)
  return os.fspath(path)


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
  import torch  # noqa: PLC0415
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def random_model(config: NemotronHConfig, dtype=None, seed: int = 0, layout=None):
  """A model with random weights made one tensor at a time, directly in its dtype.

  For benchmarks at real sizes: device memory peaks at the weights plus one tensor's temporaries
  (the modules' own initialiser draws float32 first). Values keep activations O(1): matrices
  ~ N(0, 1/fan_in), A_log = log U(1, 16), dt_bias ~ N(-3, 1), other vectors (norm scales, D,
  biases) 1.

  With a `nemojax.sharding.Layout`, each tensor is drawn straight into its shards (no device
  holds a whole tensor) and the model carries the layout; the values equal the unsharded
  model's (JAX's partitionable threefry), so sharded runs compare against single-device ones.
  """
  import functools  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from nemojax.model import NemotronH  # noqa: PLC0415
  dtype = jnp.bfloat16 if dtype is None else dtype
  abstract = nnx.eval_shape(lambda: NemotronH(config, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  leaves, treedef = jax.tree.flatten_with_path(state)

  def draw_values(key, shape, dt, kind):
    if kind == "A_log":
      return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dt)
    if kind == "dt_bias":
      return (jax.random.normal(key, shape, jnp.float32) - 3.0).astype(dt)
    if kind == "ones":
      return jnp.ones(shape, dt)
    scale = 1.0 / math.sqrt(shape[-1])
    return (jax.random.normal(key, shape, dt) * jnp.asarray(scale, dt)).astype(dt)

  draw = jax.jit(draw_values, static_argnums=(1, 2, 3))

  @functools.cache
  def sharded_draw(sharding):
    return jax.jit(draw_values, static_argnums=(1, 2, 3), out_shardings=sharding)

  base = jax.random.key(seed)
  values = []
  for i, (path, leaf) in enumerate(leaves):
    name = jax.tree_util.keystr(path)
    kind = ("A_log" if "A_log" in name else "dt_bias" if "dt_bias" in name
            else "ones" if leaf.ndim == 1 else "weight")
    fn = draw if layout is None else sharded_draw(jax.sharding.NamedSharding(
        layout.mesh, layout.param_spec(path, leaf.shape)))
    values.append(jax.block_until_ready(fn(jax.random.fold_in(base, i), tuple(leaf.shape),
                                           jnp.dtype(leaf.dtype), kind)))
  model = nnx.merge(graphdef, jax.tree.unflatten(treedef, values))
  if layout is not None:
    from nemojax.sharding import attach  # noqa: PLC0415
    attach(model, layout)
  return model


@dataclasses.dataclass(frozen=True)
class NotebookModel:
  """What a research notebook runs on (see `notebook_model`)."""

  model: Any
  tokenizer: Any
  tiny: bool                 # NEMOJAX_NOTEBOOK_TINY=1: the demo model, offline, in float32
  checkpoint: str | None     # a converted (or HF) checkpoint directory, if any
  dtype: Any

  @property
  def meaningful(self) -> bool:
    """Whether the weights are trained (the demo or a checkpoint), not random."""
    return self.tiny or self.checkpoint is not None


def notebook_model() -> NotebookModel:
  """The notebooks' model, chosen by environment variables.

  NEMOJAX_NOTEBOOK_TINY=1: the built-in demo model (offline, seconds on a CPU; what the tests
  run). NEMOJAX_MODEL=DIR: that checkpoint. NEMOJAX_DOWNLOAD=1: NVIDIA's Nano-9B-v2 from the Hub
  (huggingface_hub), converted once to ./nano-9b-v2. Otherwise the Nano-9B-v2 shape with random
  bf16 weights (`random_model`): real memory and time, meaningless text; the demo's tokenizer.
  """
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  import jax.numpy as jnp  # noqa: PLC0415

  from nemojax.checkpoint import load  # noqa: PLC0415
  from nemojax.demo import demo_model_path  # noqa: PLC0415
  from nemojax.tokenizer import Tokenizer  # noqa: PLC0415
  tiny = os.environ.get("NEMOJAX_NOTEBOOK_TINY") == "1"
  checkpoint = os.environ.get("NEMOJAX_MODEL")
  if not tiny and checkpoint is None and os.environ.get("NEMOJAX_DOWNLOAD") == "1":
    from huggingface_hub import snapshot_download  # noqa: PLC0415
    hf_dir = snapshot_download("nvidia/NVIDIA-Nemotron-Nano-9B-v2")
    checkpoint = "nano-9b-v2"
    if not os.path.isdir(checkpoint):  # streams one tensor at a time: ~1.5 GB of RAM
      subprocess.run([sys.executable, "-m", "nemojax.convert", hf_dir, checkpoint], check=True)
  dtype = jnp.float32 if tiny else jnp.bfloat16
  if tiny or checkpoint:
    path = demo_model_path() if tiny else checkpoint
    return NotebookModel(load(path, dtype=dtype), Tokenizer.from_pretrained(path), tiny,
                         checkpoint, dtype)
  model = random_model(NemotronHConfig.nano_9b_v2(), dtype)
  return NotebookModel(model, Tokenizer.from_pretrained(demo_model_path()), tiny, None, dtype)
