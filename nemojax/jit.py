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

import weakref
from typing import Any, Callable, Sequence

import jax
from flax import nnx

__all__ = ["Graph", "graph", "jit", "split"]


class Graph:
  """An interned, O(1)-hashable wrapper of an NNX GraphDef (the static half of a split module)."""

  __slots__ = ("graphdef", "_hash", "__weakref__")

  def __init__(self, graphdef):
    self.graphdef = graphdef
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


def graph(graphdef) -> Graph:
  """The interned handle of `graphdef`: equal GraphDefs give the same handle."""
  handle = _INTERNED.get(graphdef)
  if handle is None:
    handle = _INTERNED[graphdef] = Graph(graphdef)
  return handle


def split(module: nnx.Module, *filters) -> tuple:
  """`nnx.split(module, *filters)` with the GraphDef replaced by its interned `Graph`.

  A module split again (an eager forward) reuses its last handle when the structure is unchanged;
  comparing two GraphDefs costs a fraction of hashing one.
  """
  graphdef, *states = nnx.split(module, *filters)
  handle = _BY_MODULE.get(module)
  if handle is None or handle.graphdef != graphdef:
    handle = graph(graphdef)
    _BY_MODULE[module] = handle
  return (handle, *states)


def jit(fn: Callable, *, static_argnums: Sequence[int] = (),
        donate_argnums: Sequence[int] = ()) -> Callable:
  """`jax.jit(fn)` for a function whose first argument is a `Graph` (always static).

  Argument numbers count `fn`'s own positions (0 is the graph). The function merges the module
  itself (`graph.merge(params)`), where it needs it: inside `jax.grad`, for example.
  """
  return jax.jit(fn, static_argnums=(0, *static_argnums), donate_argnums=tuple(donate_argnums))
