"""Decode reads only the chosen experts' weights.

A decode step at batch 1 must not touch all E routed experts (at the Nano 30B-A3B shape that is
2.5 GB per layer against 120 MB for the six chosen ones: 20x slower decode). XLA's cost analysis
cannot show this (it charges a gather with its whole operand), so the check is structural: in
the traced decode step every use of a layer's stacked expert weights is a gather of single
experts (slice size 1 on the expert axis) with m·k indices, followed into nested jaxprs; and the
Mosaic GPU kernel's layout gives tiles (hence weight reads) only to the chosen experts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax import moe as moe_lib
from nemojax import testing as T
from nemojax.kernels import moe as kmoe
from nemojax.kernels.moe import pallas_mosaic_gpu as kernel
from nemojax.model import NemotronH


def _sub_jaxprs(eqn):
  """(inner jaxpr, outer invars feeding its invars) for the call-like primitives."""
  p, ins = eqn.params, list(eqn.invars)
  name = eqn.primitive.name
  if name == "cond":
    return [(b.jaxpr, ins[1:]) for b in p["branches"]]
  if name == "while":
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    return [(p["cond_jaxpr"].jaxpr, ins[:nc] + ins[nc + nb:]),
            (p["body_jaxpr"].jaxpr, ins[nc:])]
  subs = []
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = p.get(key)
    if sub is not None:
      inner = getattr(sub, "jaxpr", sub)
      if len(inner.invars) == len(ins):
        subs.append((inner, ins))
  return subs


def weight_reads(jaxpr, var):
  """Every non-call equation that reads `var`, following it into nested jaxprs."""
  reads = []
  for eqn in jaxpr.eqns:
    if not any(v is var for v in eqn.invars):
      continue
    subs = _sub_jaxprs(eqn)
    if not subs:
      reads.append(eqn)
    for inner, outer in subs:
      for inner_var, outer_var in zip(inner.invars, outer):
        if outer_var is var:
          reads.extend(weight_reads(inner, inner_var))
  return reads


def _is_expert_gather(eqn, num_indices):
  if eqn.primitive.name != "gather" or eqn.params["slice_sizes"][0] != 1:
    return False
  idx = eqn.invars[1].aval
  return int(np.prod(idx.shape[:-1])) == num_indices  # one expert matrix per index


def xla_ffn(*args):
  return kmoe.moe_ffn(*args, implementation="xla")


def test_routed_ffn_at_one_token_gathers_chosen_experts():
  e, k, d, f = 128, 6, 64, 48
  S = jax.ShapeDtypeStruct
  args = (S((1, d), jnp.bfloat16), S((1, k), jnp.int32), S((1, k), jnp.float32),
          S((e, f, d), jnp.bfloat16), S((e, d, f), jnp.bfloat16))
  closed = jax.make_jaxpr(xla_ffn)(*args)
  for var in closed.jaxpr.invars[3:]:
    reads = weight_reads(closed.jaxpr, var)
    assert reads and all(_is_expert_gather(r, k) for r in reads), [str(r)[:120] for r in reads]
  # the prefill path (sort + grouped matmul) reads whole stacks: the check can fail
  big = (S((64, d), jnp.bfloat16), S((64, k), jnp.int32), S((64, k), jnp.float32)) + args[3:]
  closed = jax.make_jaxpr(xla_ffn)(*big)
  reads = weight_reads(closed.jaxpr, closed.jaxpr.invars[3])
  assert not all(_is_expert_gather(r, 64 * k) for r in reads)


@pytest.mark.parametrize("batch", [1, 2])
def test_model_decode_step_reads_only_chosen_experts(batch):
  cfg = T.MOE_CONFIGS["moe"].replace(n_routed_experts=32, num_experts_per_tok=3)
  model = NemotronH(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  moe_lib.set_implementation(model, "xla")  # the XLA path; the kernel's is checked below
  graph, state = nnx.split(model)
  cache = model.init_cache(batch, 8)

  def step(state, ids, cache):
    return nnx.merge(graph, state)(ids, cache=cache)[0]

  closed = jax.make_jaxpr(step)(state, jnp.ones((batch, 1), jnp.int32), cache)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  stacks = [i for i, p in enumerate(paths)
            if "['experts']" in p and ("up_proj" in p or "down_proj" in p)]
  assert len(stacks) == 2 * sum(t.value == "E" for t in cfg.layer_types)
  for i in stacks:
    reads = weight_reads(closed.jaxpr, closed.jaxpr.invars[i])
    assert reads and all(_is_expert_gather(r, batch * 3) for r in reads), (
        paths[i], [str(r)[:120] for r in reads])


def test_kernel_decode_tiles_only_chosen_experts():
  # Only tiles with tile_expert >= 0 load weights (the kernel exits at once on the others), and
  # each loads its own expert's: at one token, exactly the k chosen experts, once each.
  e, k = 128, 6
  ids = jnp.asarray([[100, 3, 77, 64, 5, 127]], jnp.int32)
  cfg = kernel.default_config(k, e)
  assert kernel.per_pair(1, k, e)
  for layout in (kernel.pair_layout(ids, cfg.tile_m), kernel.padded_layout(ids, e, cfg.tile_m)):
    tile_expert = np.asarray(layout[2])
    used = tile_expert[tile_expert >= 0]
    assert sorted(used.tolist()) == sorted(np.asarray(ids)[0].tolist())
