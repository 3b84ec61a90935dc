"""The one jit boundary of nemojax (DESIGN point 8): split an NNX module once, pass its state to
plain `jax.jit` functions as arguments, merge inside.

    graph, params = jit.split(model)              # the static half and the arrays
    step = jit.jit(lambda graph, params, x: graph.merge(params)(x))
    y = step(graph, params, x)                    # compiled once per (graph, shapes)

Why not close over the model: closed-over parameters become constants of the program (copied
into every executable, recompiled when they change). Why not `nnx.jit`: it walks the module graph
on every call. Why a `Graph` handle rather than the GraphDef itself: jit hashes static arguments
on every call, and a GraphDef's hash walks the whole module tree (about a millisecond for the 9B
model, paid per prefill chunk, decode segment and eager forward). A `Graph` hashes in O(1) and
compares by identity; handles are interned, so equal structures share one handle and therefore
one compiled program.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from nemojax import sharding

__all__ = ["Graph", "graph", "jit", "split"]


class Graph:
  """An interned, O(1)-hashable wrapper of an NNX GraphDef (the static half of a split module)."""

  __slots__ = ("graphdef", "layout", "_hash", "__weakref__")

  def __init__(self, graphdef, layout=None):
    self.graphdef = graphdef
    self.layout = layout  # the model's `sharding.Layout` (part of the GraphDef), or None
    self._hash = hash(graphdef)

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return self is other

  def merge(self, *states) -> Any:
    """The module rebuilt from this structure and `states` (inside a traced function)."""
    return nnx.merge(self.graphdef, *states)


_INTERNED: dict = {}  # GraphDef -> Graph; structures are few per process (one per model kind)
_BY_MODULE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> last Graph


def graph(graphdef, layout=None) -> Graph:
  """The interned handle of `graphdef`: equal GraphDefs give the same handle. `layout` is the
  split module's sharding layout (static data of the GraphDef, so equal GraphDefs share it)."""
  handle = _INTERNED.get(graphdef)
  if handle is None:
    handle = _INTERNED[graphdef] = Graph(graphdef, layout)
  return handle


def split(module: nnx.Module, *filters) -> tuple:
  """`nnx.split(module, *filters)` with the GraphDef replaced by its interned `Graph`.

  A module split again (an eager forward) reuses its last handle when the structure is unchanged;
  comparing two GraphDefs costs a fraction of hashing one.
  """
  graphdef, *states = nnx.split(module, *filters)
  handle = _BY_MODULE.get(module)
  if handle is None or handle.graphdef != graphdef:
    handle = graph(graphdef, sharding.layout_of(module))
    _BY_MODULE[module] = handle
  return (handle, *states)


def jit(fn: Callable, *, static_argnums: Sequence[int] = (),
        donate_argnums: Sequence[int] = (), out_specs: Callable | None = None) -> Callable:
  """`jax.jit(fn)` for a function whose first argument is a `Graph` (always static).

  Argument numbers count `fn`'s own positions (0 is the graph). The function merges the module
  itself (`graph.merge(params)`), where it needs it: inside `jax.grad`, for example.

  `out_specs(layout, *args)` gives the PartitionSpecs of fn's outputs for a model sharded over
  an Explicit mesh: the body then runs with Auto axes (`sharding.auto_call`) and its outputs come
  back with these shardings. Without it, such a model is refused.
  """
  static = (0, *static_argnums)

  @functools.wraps(fn)
  def body(graph: Graph, *args):
    layout = graph.layout
    if layout is None or not layout.explicit:
      return fn(graph, *args)
    if out_specs is None:
      raise ValueError(f"{getattr(fn, '__name__', fn)}: this function does not support models "
                       "sharded over an Explicit mesh (no out_specs)")
    dynamic = [i for i in range(len(args)) if i + 1 not in static]

    def inner(*dynamic_args):
      full = list(args)
      for i, a in zip(dynamic, dynamic_args):
        full[i] = a
      return fn(graph, *full)
    return sharding.auto_call(layout, inner, *[args[i] for i in dynamic],
                              out_specs=out_specs(layout, *args))

  jitted = jax.jit(body, static_argnums=static, donate_argnums=tuple(donate_argnums))
  if out_specs is None:
    return jitted
  return _Committing(jitted)


class _Committing:
  """A jitted function that, for a model on an Explicit mesh, first commits its uncommitted
  array arguments (fresh `jnp` values) to replicated on the mesh: left uncommitted, the compiler
  may pick a sharding for them that differs from the outputs' they are donated into."""

  def __init__(self, jitted):
    self._jitted = jitted
    functools.update_wrapper(self, jitted)

  def __call__(self, graph: Graph, *args):
    layout = graph.layout
    if layout is not None and layout.explicit:
      args = sharding.commit(layout, args)
    return self._jitted(graph, *args)

  def __getattr__(self, name):  # lower, _cache_size, ... of the jitted function
    return getattr(self._jitted, name)
