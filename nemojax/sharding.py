"""Sharding a Nemotron-H model over a device mesh with JAX's SPMD partitioner.

Every parameter, activation and decode-state dimension has a *logical* axis name; `rules` map
logical names to the axes of a `jax.sharding.Mesh` (any subset of data, fsdp, tensor, expert).
JAX's partitioner (GSPMD / Shardy) then splits the computation and inserts the collectives.

Logical names (parameters keep the HF layout, Linear.weight is [out, in]):

    embed        model width D of a weight                 default -> fsdp
    vocab        vocabulary (embeddings, lm_head)          default -> tensor
    heads        attention query heads (q_proj rows h·d)   default -> tensor
    kv_heads     attention key/value heads                 default -> tensor
    head_dim     attention head dim                        replicated
    mlp          MLP / expert hidden width                 default -> tensor
    mamba_heads  Mamba heads (A_log, D, dt_bias, SSM state) default -> tensor
    mamba_inner  Mamba inner width I = h·p (out_proj, norm) default -> tensor
    mamba_fused  in_proj's output [z | xBC | dt]           default -> tensor
    mamba_conv   conv channels (xBC, conv_dim)             default -> tensor
    state        SSM state size                            replicated
    expert       routed experts                            default -> expert
    batch        activation / cache rows                   default -> (data, fsdp)
    norm, latent, length                                   replicated

The defaults are Megatron-style tensor parallelism (column-parallel in-projections, row-parallel
out-projections, so one all-reduce per block), ZeRO-3-style FSDP over the embed dimension (XLA
all-gathers each weight before use), data parallelism over the batch, and expert parallelism.

Mamba's in_proj output concatenates z [I], xBC [I + 2·g·n] and dt [h]; an even split of that
fused dimension over `tensor` does not fall on head boundaries. We shard it evenly anyway and
constrain the head-structured tensors (x [b, t, h, p], dt, the SSM state) to heads over
`tensor`: XLA reshards the misaligned slices, which is correct, keeps every weight partitioned and
costs communication of the order of one block's activations per Mamba layer (not measured). A
head-aligned layout (permuting in_proj's rows per shard at load time, undone on export) would
remove that traffic and is left for later.

A dimension that its mesh axes do not divide is replicated (rules' `on_indivisible="replicate"`,
the default) or refused with one line naming the tensor (`"error"`). A dimension's mesh axes
are tried in order: `batch -> (data, fsdp)` falls back to `data` alone before replicating.

Explicit meshes (`jax.make_mesh`'s default in current JAX): arrays are placed on the user's mesh
as given; inside the model's compiled functions the axes are switched to Auto (`auto_call`), so
the partitioner decides how to shard intermediate values (Explicit sharding-in-types would need an
`out_sharding` on every gather, reshape and einsum of the model) and the outputs come back with
explicit shardings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from nemojax.config import NemotronHConfig

MESH_AXES = ("data", "fsdp", "tensor", "expert")

DEFAULT_RULES: Mapping[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "mamba_heads": ("tensor",),
    "mamba_inner": ("tensor",),
    "mamba_fused": ("tensor",),
    "mamba_conv": ("tensor",),
    "expert": ("expert",),
}

# Parameter path suffix (after `backbone.layers.{i}.` for block parameters) -> logical axes.
PARAM_AXES: Mapping[str, tuple[str | None, ...]] = {
    "backbone.embeddings.weight": ("vocab", "embed"),
    "lm_head.weight": ("vocab", "embed"),
    "backbone.norm_f.weight": ("norm",),
    "norm.weight": ("norm",),
    # Mamba-2
    "mixer.in_proj.weight": ("mamba_fused", "embed"),
    "mixer.conv1d.weight": ("mamba_conv", None, None),
    "mixer.conv1d.bias": ("mamba_conv",),
    "mixer.A_log": ("mamba_heads",),
    "mixer.D": ("mamba_heads",),
    "mixer.dt_bias": ("mamba_heads",),
    "mixer.norm.weight": ("mamba_inner",),
    "mixer.out_proj.weight": ("embed", "mamba_inner"),
    # attention
    "mixer.q_proj.weight": ("heads", "embed"),
    "mixer.k_proj.weight": ("kv_heads", "embed"),
    "mixer.v_proj.weight": ("kv_heads", "embed"),
    "mixer.o_proj.weight": ("embed", "heads"),
    # MLP
    "mixer.up_proj.weight": ("mlp", "embed"),
    "mixer.down_proj.weight": ("embed", "mlp"),
    # MoE: the router stays whole (every token scores every expert)
    "mixer.gate.weight": (None, "embed"),
    "mixer.gate.e_score_correction_bias": (None,),
    "mixer.experts.up_proj": ("expert", "mlp", "embed"),
    "mixer.experts.down_proj": ("expert", "embed", "mlp"),
    "mixer.shared_experts.up_proj.weight": ("mlp", "embed"),
    "mixer.shared_experts.down_proj.weight": ("embed", "mlp"),
    "mixer.fc1_latent_proj.weight": ("latent", "embed"),
    "mixer.fc2_latent_proj.weight": ("embed", "latent"),
}

# Activations and decode state (Mamba conv history, SSM state, KV cache, logits).
ACTIVATION_AXES: Mapping[str, tuple[str | None, ...]] = {
    "residual": ("batch", "length", None),  # [b, t, D] between blocks
    "mamba_x": ("batch", "length", "mamba_heads", None),  # [b, t, h, p]
    "mamba_dt": ("batch", "length", "mamba_heads"),  # [b, t, h]
    "mamba_conv_state": ("batch", None, "mamba_conv"),  # [b, K-1, conv_dim]
    "ssm_state": ("batch", "mamba_heads", None, "state"),  # [b, h, p, n]
    "attn_q": ("batch", "length", "heads", "head_dim"),  # [b, t, h, d]
    "kv": ("batch", "kv_heads", "length", "head_dim"),  # [b, kv, s, d]
    "logits": ("batch", "length", "vocab"),  # [b, t, V]
}


def param_axes(path: Sequence[str | int]) -> tuple[str | None, ...]:
  """Logical axes of the parameter at `path` (a state path such as
  ('backbone', 'layers', 3, 'mixer', 'in_proj', 'weight'))."""
  parts = [str(p) for p in path if str(p) != "base_module"]  # a LoRA-wrapped Linear's weight
  if parts and parts[-1] in ("lora_a", "lora_b"):
    # LoRA adapters x @ a [in, r] @ b [r, out] follow their weight's [out, in] split.
    out_axis, in_axis = param_axes(parts[:-1] + ["weight"])
    return (in_axis, None) if parts[-1] == "lora_a" else (None, out_axis)
  if len(parts) > 3 and parts[:2] == ["backbone", "layers"]:
    parts = parts[3:]
  name = ".".join(parts)
  if name not in PARAM_AXES:
    raise KeyError(f"nemojax.sharding: no logical axes for parameter {'.'.join(map(str, path))}; "
                   "add it to PARAM_AXES")
  return PARAM_AXES[name]


def _unit_counts(config: NemotronHConfig | None) -> dict[str, int]:
  # A head dimension stored merged ([h·d]) may only be split between whole heads.
  if config is None:
    return {}
  units = {"heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
           "mamba_heads": config.mamba_num_heads, "mamba_inner": config.mamba_num_heads}
  if getattr(config, "n_routed_experts", None):
    units["expert"] = config.n_routed_experts
  return units


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh plus the rules that map logical axis names onto it (hashable: static under jit).

  Attributes:
    mesh: the device mesh (Auto or Explicit axes).
    rules: logical name -> mesh axes, as a sorted tuple of pairs (see `make_layout`).
    units: logical name -> how many heads/experts the dimension holds (splits stay whole).
    on_indivisible: "replicate" or "error" for a dimension its mesh axes do not divide.
  """

  mesh: jax.sharding.Mesh
  rules: tuple[tuple[str, tuple[str, ...]], ...]
  units: tuple[tuple[str, int], ...] = ()
  on_indivisible: str = "replicate"

  # ---------------------------------------------------------------------------------------------
  def spec(self, logical: Sequence[str | None], shape: Sequence[int] | None = None,
           name: str = "array") -> P:
    """The PartitionSpec of an array with these logical axes (and, if given, this shape)."""
    rules, units = dict(self.rules), dict(self.units)
    sizes = dict(zip(self.mesh.axis_names, self.mesh.devices.shape))
    used: set[str] = set()
    out = []
    for dim, axis in enumerate(logical):
      axes = tuple(a for a in rules.get(axis, ()) if a in sizes and a not in used) if axis else ()
      if shape is not None and axes:
        wanted = axes
        axes = _divisible_prefix(axes, sizes, shape[dim], units.get(axis))
        if axes != wanted and self.on_indivisible == "error":
          raise ValueError(
              f"{name}: dimension {dim} ({axis}, size {shape[dim]}"
              + (f", {units[axis]} {axis}" if axis in units else "")
              + f") does not divide mesh axes {wanted} of size "
              f"{math.prod(sizes[a] for a in wanted)}; use a mesh that divides it or "
              f"on_indivisible='replicate'")
      used.update(axes)
      out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
      out.pop()
    return P(*out)

  def sharding(self, logical: Sequence[str | None], shape: Sequence[int] | None = None,
               name: str = "array") -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(logical, shape, name))

  @property
  def explicit(self) -> bool:
    """Whether any mesh axis is Explicit (the model then runs its body with Auto axes)."""
    types = getattr(self.mesh, "axis_types", None) or ()
    return any("Explicit" in str(t) for t in types)

  # ---------------------------------------------------------------------------------------------
  def param_spec(self, path: Sequence[str | int], shape: Sequence[int]) -> P:
    """The spec of a model parameter; parameters PARAM_AXES does not name (adapters added to a
    model, say) and leaves whose rank differs from the table's (optimizer scalars) replicate."""
    parts = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
    if parts and parts[-1] == "value":  # an nnx.Variable's array
      parts = parts[:-1]
    for i, key in enumerate(parts):  # the parameter path inside e.g. an optimizer's moments
      if key in ("backbone", "lm_head"):
        parts = parts[i:]
        break
    try:
      axes = param_axes(parts)
    except KeyError:
      return P()
    if len(axes) != len(shape):
      return P()
    return self.spec(axes, shape, name=".".join(map(str, parts)))

  def tree_specs(self, tree):
    """Specs for any pytree holding parameter-shaped leaves under their parameter paths
    (params, gradients, optimizer moments, a whole train state); other leaves replicate."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: self.param_spec(path, np.shape(x)), tree)

  def tree_shardings(self, tree):
    """`tree_specs` as NamedShardings on this layout's mesh."""
    return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.tree_specs(tree),
                        is_leaf=lambda s: isinstance(s, P))

  def tensor_sharding(self, spec) -> NamedSharding:
    """For `nemojax.load(..., sharding=)`: a checkpoint TensorSpec -> its NamedSharding."""
    return NamedSharding(self.mesh, self.param_spec(spec.path, spec.shape))

  def state_specs(self, state: nnx.State):
    """A pure dict of PartitionSpecs mirroring `nnx.to_pure_dict(state)` (parameters)."""
    pure = nnx.to_pure_dict(state)
    return _map_with_path(lambda path, x: self.param_spec(path, x.shape), pure)

  def shard_state(self, state: nnx.State) -> nnx.State:
    """Places every array of a model state into its shards (returns a new state)."""
    pure = nnx.to_pure_dict(state)
    placed = _map_with_path(lambda path, x: jax.device_put(
        x, NamedSharding(self.mesh, self.param_spec(path, x.shape))), pure)
    state = jax.tree.map(lambda x: x, state)  # a copy: the caller's state is left as it was
    nnx.replace_by_pure_dict(state, placed)
    return state

  def activation_spec(self, kind: str, shape: Sequence[int] | None = None) -> P:
    return self.spec(ACTIVATION_AXES[kind], shape, name=kind)

  def cache_specs(self, cache):
    """PartitionSpecs for a `Cache` (or its abstract shapes), leaf for leaf."""
    from nemojax.cache import Cache, KVState, MambaState  # noqa: PLC0415  (cache imports config)

    def layer(s):
      if isinstance(s, MambaState):
        return MambaState(conv=self.activation_spec("mamba_conv_state", s.conv.shape),
                          ssm=self.activation_spec("ssm_state", s.ssm.shape))
      if isinstance(s, KVState):
        return KVState(k=self.activation_spec("kv", s.k.shape),
                       v=self.activation_spec("kv", s.v.shape))
      return None
    # `start` (a few ints per row) is replicated like the rest of the loop's bookkeeping; a
    # sharded [b] vector beside replicated ones of the same shape confuses buffer donation.
    return Cache(layers=tuple(layer(s) for s in cache.layers), pos=P(), start=P())

  def init_cache(self, config, batch_size: int, max_len: int, dtype):
    """An empty decode state created straight into its shards (never whole on one device)."""
    from nemojax import cache as cache_lib  # noqa: PLC0415

    make = lambda: cache_lib.init_cache(config, batch_size, max_len, dtype)
    specs = self.cache_specs(jax.eval_shape(make))
    shardings = jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs,
                             is_leaf=lambda s: isinstance(s, P))
    return jax.jit(make, out_shardings=shardings)()

  def shard_cache(self, cache):
    """The decode state placed batch over data, KV over kv heads, SSM state over Mamba heads."""
    specs = self.cache_specs(cache)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(self.mesh, s)), cache, specs,
                        is_leaf=lambda x: x is None)

  def constrain(self, x: jax.Array, kind: str) -> jax.Array:
    """A sharding constraint on an activation inside a compiled function (see ACTIVATION_AXES).

    The spec is resolved against the mesh of the surrounding `auto_call`; outside one (a model
    traced without a mesh context) the constraint names this layout's mesh directly.
    """
    spec = self.activation_spec(kind, x.shape)
    if not _context_mesh().empty:
      return jax.lax.with_sharding_constraint(x, spec)
    if self.explicit:  # Explicit axes outside auto_call: the types already carry shardings
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def _divisible_prefix(axes, sizes, dim_size, units):
  # Longest prefix of `axes` whose product divides the dimension (and its count of heads).
  while axes:
    n = math.prod(sizes[a] for a in axes)
    if dim_size % n == 0 and (units is None or units % n == 0):
      return axes
    axes = axes[:-1]
  return ()


def _map_with_path(fn, tree, prefix=()):
  if isinstance(tree, dict):
    return {k: _map_with_path(fn, v, prefix + (k,)) for k, v in tree.items()}
  return fn(prefix, tree)


def _context_mesh():
  get = getattr(jax.sharding, "get_abstract_mesh", None)
  if get is None:
    return jax.sharding.Mesh(np.empty((0,), object), ())
  return get()


def make_layout(mesh: jax.sharding.Mesh, config: NemotronHConfig | None = None, *,
                rules: Mapping[str, str | Sequence[str] | None] | None = None,
                on_indivisible: str = "replicate") -> Layout:
  """A `Layout` from a mesh, the model config (for head counts) and optional rule overrides.

  Args:
    mesh: a `jax.sharding.Mesh` whose axis names are among data, fsdp, tensor, expert (other
      names are allowed if `rules` use them).
    config: the model's config; lets a merged heads dimension be split only between whole heads.
    rules: overrides of DEFAULT_RULES, e.g. ``{"embed": None}`` (no FSDP) or
      ``{"vocab": ("tensor", "fsdp")}``; a logical name mapped to None is replicated.
    on_indivisible: "replicate" (default) or "error".
  """
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  if on_indivisible not in ("replicate", "error"):
    raise ValueError(f"on_indivisible must be 'replicate' or 'error', got {on_indivisible!r}")
  merged = dict(DEFAULT_RULES)
  for name, axes in (rules or {}).items():
    merged[name] = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  known = set(MESH_AXES) | {a for axes in merged.values() for a in axes}
  unknown = [a for a in mesh.axis_names if a not in known]
  if unknown:
    raise ValueError(f"mesh axes {unknown} are not used by any sharding rule; name mesh axes "
                     f"from {MESH_AXES} or map a logical axis to them with rules=")
  return Layout(mesh=mesh, rules=tuple(sorted(merged.items())),
                units=tuple(sorted(_unit_counts(config).items())), on_indivisible=on_indivisible)


def layout_of(module) -> Layout | None:
  """The layout a model was sharded with (`shard_model`, `nemojax.load(mesh=)`), or None."""
  return getattr(module, "sharding_layout", None)


def attach(model, layout: Layout | None):
  """Remembers `layout` on every module of `model` (static graph data, so it is part of the
  compiled functions' key): modules read it to constrain their activations. Returns the model."""
  for _, module in nnx.iter_graph(model):
    if isinstance(module, nnx.Module):
      module.sharding_layout = layout
  return model


def constrain(module, x: jax.Array, kind: str) -> jax.Array:
  """`x` constrained to the activation sharding `kind` of the layout `module` carries (if any)."""
  layout = layout_of(module)
  return x if layout is None else layout.constrain(x, kind)


def kernel_choice(module, implementation: str | None) -> str | None:
  """A kernel implementation for `module`: on a mesh the automatic choice is "xla", which the
  partitioner splits (the Pallas kernels are custom calls it cannot see into; asked for
  explicitly, they run per shard: `ssd_per_shard`, `attention_per_shard`)."""
  if implementation is None and layout_of(module) is not None:
    return "xla"
  return implementation


def ssd_per_shard(module, ssd_fn: Callable, x, dt, A, B, C, D, initial_state):
  """Runs `ssd_fn(x, dt, A, B, C, D, initial_state) -> (y, state)` once per shard (`shard_map`)
  on the layout of `module`: rows split as the batch is, heads as the Mamba heads are.

  For kernels the partitioner cannot see into (Pallas custom calls): left to it, every device
  would gather the whole batch and run every head. Heads are split only when the split keeps
  whole B/C groups (head i reads group i // (h/g)), so each shard's heads read its own groups;
  otherwise heads are whole on each shard and only rows are split.
  """
  layout = layout_of(module)
  if layout is None:
    return ssd_fn(x, dt, A, B, C, D, initial_state)
  b, _, h, _ = x.shape
  g = B.shape[2]
  rows = _first(layout.spec(("batch",), (b,)))
  heads = _first(layout.spec(("mamba_heads",), (h,)))
  sizes = dict(zip(layout.mesh.axis_names, layout.mesh.devices.shape))
  if heads is not None and g % math.prod(sizes[a] for a in _as_tuple(heads)):
    heads = None
  groups = heads
  has_d, has_state = D is not None, initial_state is not None

  def local(x, dt, A, B, C, D, s0):
    return ssd_fn(x, dt, A, B, C, D if has_d else None, s0 if has_state else None)

  context = _context_mesh()
  mesh = context if not context.empty else layout.mesh
  in_specs = (P(rows, None, heads, None), P(rows, None, heads), P(heads),
              P(rows, None, groups, None), P(rows, None, groups, None),
              P(heads) if has_d else P(), P(rows, heads, None, None) if has_state else P())
  out_specs = (P(rows, None, heads, None), P(rows, heads, None, None))
  placeholder = jax.numpy.zeros((), x.dtype)
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(x, dt, A, B, C, D if has_d else placeholder,
                                        initial_state if has_state else placeholder)


def attention_per_shard(module, attend: Callable, q, k, v, pos, start, num_keys):
  """Runs `attend(q, k, v, pos, start, num_keys) -> o` once per shard (`shard_map`) on the layout
  of `module`: rows split as the batch is, KV heads as `kv_heads` are, query heads with them.

  For the Pallas attention kernel (a custom call the partitioner cannot see into). Query head i
  reads KV head i // (h/kv), so splitting both head dimensions into the same number of
  contiguous blocks keeps each shard's query heads with their KV heads.
  """
  layout = layout_of(module)
  if layout is None:
    return attend(q, k, v, pos, start, num_keys)
  b, kv = k.shape[0], k.shape[1]
  rows = _first(layout.spec(("batch",), (b,)))
  heads = _first(layout.spec(("kv_heads",), (kv,)))
  context = _context_mesh()
  mesh = context if not context.empty else layout.mesh
  scalar = lambda x: jax.numpy.asarray(x, jax.numpy.int32)
  return jax.shard_map(
      attend, mesh=mesh, out_specs=P(rows, None, heads, None), check_vma=False,
      in_specs=(P(rows, None, heads, None), P(rows, heads, None, None),
                P(rows, heads, None, None), P(), P(rows), P()))(
                    q, k, v, scalar(pos), start, scalar(num_keys))


def experts_per_shard(module, ffn: Callable, x, expert_ids, weights, up, down):
  """Runs the routed experts `ffn(x, expert_ids, weights, up, down) -> [m, d]` (float32) once
  per shard (`shard_map`) on the layout of `module`: expert parallelism over the `expert` axes,
  the experts' hidden width over the `mlp` axes, rows as the batch is split.

  Left to the partitioner, the gather / sort + grouped matmul over sharded expert weights move
  the chosen experts' weights between devices (for decode, an all-reduce of every gathered
  [f, d] matrix), and a Pallas kernel (a custom call) would be run on gathered operands. Here
  every device keeps its rows and scores them against the experts it holds: pairs routed to
  another device's experts get weight 0 and a local expert index (spread over the local experts
  so none is overloaded); relu² acts on each hidden unit alone, so a slice of the hidden width
  gives a slice of the sum. One all-reduce over the expert and mlp axes adds the partial outputs:
  the traffic of one tensor-parallel MLP. Each device reads only its own experts' weights; the
  zero-weight pairs are still computed, so prefill FLOPs are not divided by the expert axis (a
  token all-to-all would divide them).
  """
  layout = layout_of(module)
  if layout is None:
    return ffn(x, expert_ids, weights, up, down)
  e, f = up.shape[0], up.shape[1]
  experts = _mesh_axes(layout.spec(("expert",), (e,)))
  mlp = tuple(a for a in _mesh_axes(layout.spec(("mlp",), (f,))) if a not in experts)
  rows = _first(layout.spec(("batch",), (x.shape[0],)))
  reduce_axes = experts + mlp

  def local(x, ids, w, up, down):
    if experts:
      e_local = up.shape[0]
      offset = jax.lax.axis_index(experts) * e_local
      mine = (ids >= offset) & (ids < offset + e_local)
      ids, w = jnp.where(mine, ids - offset, ids % e_local), jnp.where(mine, w, 0.0)
    y = ffn(x, ids, w, up, down)
    return jax.lax.psum(y, reduce_axes) if reduce_axes else y

  context = _context_mesh()
  mesh = context if not context.empty else layout.mesh
  one = lambda axes: None if not axes else axes[0] if len(axes) == 1 else axes
  return jax.shard_map(
      local, mesh=mesh, check_vma=False, out_specs=P(rows, None),
      in_specs=(P(rows, None), P(rows, None), P(rows, None), P(one(experts), one(mlp), None),
                P(one(experts), None, one(mlp))))(x, expert_ids, weights, up, down)


def _first(spec: P):
  return spec[0] if len(spec) else None


def _mesh_axes(spec: P) -> tuple:
  """The mesh axes of a one-dimension spec's entry, as a tuple (() when replicated)."""
  first = _first(spec)
  return () if first is None else _as_tuple(first)


def _as_tuple(axes) -> tuple:
  return axes if isinstance(axes, tuple) else (axes,)


def shard_model(model, mesh_or_layout, *, rules=None, on_indivisible: str = "replicate"):
  """Places every parameter of `model` into its shards (in place) and returns the model.

  Args:
    model: a `NemotronH` (or any module whose parameters PARAM_AXES names).
    mesh_or_layout: a `jax.sharding.Mesh` (sharded with `make_layout(mesh, model.config, ...)`)
      or a `Layout`.
    rules, on_indivisible: see `make_layout`.
  """
  layout = (mesh_or_layout if isinstance(mesh_or_layout, Layout)
            else make_layout(mesh_or_layout, getattr(model, "config", None), rules=rules,
                             on_indivisible=on_indivisible))
  nnx.update(model, layout.shard_state(nnx.state(model)))
  return attach(model, layout)


def init_model(build: Callable[[], nnx.Module], layout: Layout):
  """The module `build()` returns, created straight into its shards (random initialisation for
  training from scratch or benchmarks): the initialiser is compiled with the layout's output
  shardings, so no device ever holds the whole model.

  Example:
    model = init_model(lambda: NemotronH(config, rngs=nnx.Rngs(0)), make_layout(mesh, config))
  """
  graphdef, state = nnx.split(nnx.eval_shape(build))
  shardings = _map_with_path(lambda path, x: NamedSharding(
      layout.mesh, layout.param_spec(path, x.shape)), nnx.to_pure_dict(state))
  pure = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build())), out_shardings=shardings)()
  nnx.replace_by_pure_dict(state, pure)
  return attach(nnx.merge(graphdef, state), layout)


# ------------------------------------------------------------------------------------------------
# Running a compiled body with Auto axes
# ------------------------------------------------------------------------------------------------
def spec_of(x) -> P | None:
  """The PartitionSpec a traced or concrete array carries (None when it carries none)."""
  sharding = getattr(jax.typeof(x), "sharding", None) if hasattr(jax, "typeof") else None
  spec = getattr(sharding, "spec", None)
  mesh = getattr(sharding, "mesh", None)
  if spec is None or mesh is None or getattr(mesh, "empty", True):
    return None
  return spec


def auto_call(layout: Layout | None, fn: Callable, *args, out_specs):
  """Calls `fn(*args)` (inside a compiled function) with the layout's mesh axes set to Auto.

  On an Explicit mesh, sharding-in-types would demand an `out_sharding` at every gather, reshape
  and einsum of the model; with Auto axes the partitioner chooses, guided by the parameters'
  shardings and `Layout.constrain`. `out_specs` (PartitionSpecs, a pytree matching fn's outputs)
  give the outputs' explicit shardings. Without a layout or on an Auto mesh `fn` runs as is.
  """
  if layout is None or not layout.explicit:
    return fn(*args)
  context = _context_mesh()
  if not context.empty and not getattr(context, "explicit_axes", ()):
    return fn(*args)  # already inside an Auto region (the model called by the decode loop)
  shardings = jax.tree.map(lambda s: NamedSharding(layout.mesh, s), out_specs,
                           is_leaf=lambda s: isinstance(s, P))
  return jax.sharding.auto_axes(fn, out_sharding=shardings)(*args)


def commit(layout: Layout, tree):
  """Uncommitted arrays of `tree` placed replicated on the layout's mesh (others untouched)."""
  replicated = NamedSharding(layout.mesh, P())
  return jax.tree.map(lambda x: jax.device_put(x, replicated) if _uncommitted(x) else x, tree)


def _uncommitted(x) -> bool:
  if not isinstance(x, jax.Array):
    return False
  try:
    return not x.committed
  except Exception:  # noqa: BLE001  (a tracer: placement is not ours to change)
    return False


def same_specs(tree):
  """out_specs for a function returning values shaped like `tree`'s (e.g. a train state)."""
  return jax.tree.map(lambda x: spec_of(x) or P(), tree)
