"""Training a Nemotron-H model with optax: mixed precision, rematerialisation, a chunked loss,
gradient accumulation, LoRA and orbax train states.

With tokens x [b, t] and a loss mask m [b, t] (1 where a token is a training target, e.g. the
assistant's tokens of a chat transcript), h = model.hidden_states(x[:, :-1]) [b, t-1, D] and the
LM head W [V, D]:

    nll  = logsumexp(h · Wᵀ) − (h · Wᵀ)[x[:, 1:]]                 # [b, t-1]
    loss = Σ m[:, 1:] · nll / max(Σ m[:, 1:], 1)                   # mean over target tokens

computed `loss_chunk_size` tokens at a time (`nemojax.losses`), so the [b, t-1, V] float32 logits
never exist (2 GiB for 4096 tokens of Nano-9B-v2, and as much again for their gradient).

Packed sequences: a batch may carry `segment_ids` [b, t] (documents laid end to end in a row, a
new one wherever the id changes). The model then keeps documents apart (`NemotronH.hidden_states`)
and the first token of a document is no target (m is zeroed there), so the loss's sum is the sum
over the documents trained one by one.

Mixed precision (`master_weights`, `moment_dtype`): the optimizer keeps a float32 master copy of
the trained parameters and float32 Adam moments; each step casts the master copy to the dtypes the
model was built with (bf16 matmul weights; norm scales, A_log, D, dt_bias stay float32), runs the
forward and backward pass in them, and the transpose of that cast hands float32 gradients back.
Without master weights a bf16 parameter takes its update rounded to bf16: an update below
2⁻⁹·|w| is lost, which is most of them at fine-tuning learning rates.

Gradient accumulation (`grad_accum_steps` = k): the batch's b rows are split into k micro-batches
scanned inside the step; each micro-batch's Σ m·nll is divided by the whole batch's target count,
so the summed gradient is the full batch's.

Rematerialisation (`remat`): every block runs under `jax.checkpoint` with a policy; "full" keeps
only the blocks' inputs and recomputes each block in the backward pass, "dots" also keeps the
outputs of the weight matmuls (the projections), "offload" keeps those in host memory. Between
"full" and "dots": "mlp" keeps only the MLP blocks' up-projection outputs (float32 [tokens,
intermediate]: the backward then recomputes no MLP matmul, since the down projection's output is
never needed again), "mlp_mamba" also the Mamba blocks' in_proj outputs (their backward then
recomputes the conv, the SSD and the norm, but no matmul). Per 4,096 tokens at Nano-9B-v2's
widths that is 257 MB per MLP block and 371 MB per Mamba block (measured on a 141 GB H200: the
9B with LoRA at 4 x 4,096 tokens fits with "mlp", 53.9 GiB, not with "mlp_mamba").

LoRA (`nemojax.lora`): `Trainer(model, wrt=nnx.LoRAParam)` trains only the adapters; the base
weights are constant inputs of the step, never updated, copied or given optimizer state.

The optimizer is AdamW (decoupled weight decay on matrices only: embeddings, projections, conv
taps; not on norm scales, A_log, D, dt_bias or biases) behind global-norm gradient clipping, with a
linear warm-up to the peak learning rate followed by a cosine decay.

The jit boundary follows DESIGN point 8 (`nemojax.jit`): the NNX model is split once; the train
step is a plain jitted function of the whole `TrainState` (master params, optimizer state, step,
rng), which it donates, and merges the model inside. `Checkpointer` saves and restores that whole
state with orbax, so `fit` resumes a run exactly where it stopped when its batches are a function
of the step number.

Example:
  trainer = Trainer(nemojax.load(path), TrainConfig(total_steps=1000, remat="full"))
  state = trainer.init_state()
  state, history = fit(trainer, state, lambda step: make_batch(step), num_steps=1000,
                       checkpoint_dir="/tmp/run")
  model = trainer.model(state)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from nemojax import jit, sharding
from nemojax.convert import integrity
from nemojax.losses import DEFAULT_LOSS_CHUNK, next_token_loss, weighted_nll
from nemojax.layers import PROJECTION
from nemojax.model import NemotronH

__all__ = [
    "REMAT_POLICIES", "Checkpointer", "TrainConfig", "TrainState", "Trainer", "fit",
    "learning_rate_schedule", "make_optimizer", "next_token_loss",
]

# {"tokens": int [b, t], "mask": optional float/bool [b, t], "segment_ids": optional int [b, t]}
Batch = Mapping[str, Any]
f32 = jnp.float32

_cp = jax.checkpoint_policies
# TrainConfig.remat -> the jax.checkpoint policy of every block (None: no rematerialisation).
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": _cp.nothing_saveable,
    # The projections (`layers.matmul`) are selected by their checkpoint name: the float32
    # output the model uses, which is what the backward needs.
    "dots": _cp.save_from_both_policies(_cp.dots_with_no_batch_dims_saveable,
                                        _cp.save_only_these_names(PROJECTION)),
    "offload": _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=(PROJECTION,),
        offload_src="device", offload_dst="pinned_host"),
    "mlp": _cp.save_only_these_names("mlp_up"),
    "mlp_mamba": _cp.save_only_these_names("mlp_up", "mamba_in_proj"),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimizer, schedule, precision and memory settings.

  Attributes:
    learning_rate: Peak learning rate, reached after `warmup_steps`.
    warmup_steps: Steps of linear warm-up from 0.
    total_steps: Length of the schedule; the cosine decay ends here.
    final_learning_rate_ratio: The cosine decays to `learning_rate` times this.
    weight_decay: AdamW's decoupled weight decay, applied to matrices only.
    b1, b2, eps: Adam's moment decay rates and epsilon.
    grad_clip_norm: Gradients are rescaled to at most this global norm (None: no clipping).
    seed: Seeds the train state's rng.
    master_weights: Keep a float32 copy of the trained parameters for the optimizer and cast it
      to the model's dtypes for each step (False: update the parameters in the model's dtypes).
      The default stays True (decided 2026-12-01): on the CPU (`benchmarks/train_curve.py
      --smoke --precision`, a 0.1M-parameter hybrid, 100 steps of 8 x 64 bytes of text, loss
      5.562 nats/byte at the start) bf16 weights with float32 moments end 0.010 above mixed
      precision at a peak learning rate of 1e-3 (3.200 vs 3.190), but make only 89% of its
      progress at 1e-4 (5.085 vs 5.024) and 21% at 1e-5 (5.548 vs 5.496): their updates below
      2⁻⁹·|w| round away, which at fine-tuning rates is most of them. What True costs: 2 more
      bytes per trained parameter in the state and a bf16 copy of the weights during the step
      (the 3.25B slice: about 10 GiB, CPU-compiled). Use False when memory forces it at high
      learning rates.
    moment_dtype: Adam's moments' dtype ("float32"; None: each parameter's stored dtype).
    remat: Rematerialisation policy of every block: one of `REMAT_POLICIES`.
    loss_chunk_size: Tokens per chunk of the fused LM head + cross-entropy (None: full logits).
    grad_accum_steps: Micro-batches per step; must divide the batch size.
  """

  learning_rate: float = 1e-3
  warmup_steps: int = 100
  total_steps: int = 1000
  final_learning_rate_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip_norm: float | None = 1.0
  seed: int = 0
  master_weights: bool = True
  moment_dtype: str | None = "float32"
  remat: str = "none"
  loss_chunk_size: int | None = DEFAULT_LOSS_CHUNK
  grad_accum_steps: int = 1

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"TrainConfig.remat: got {self.remat!r}, expected one of "
                       f"{sorted(REMAT_POLICIES)}")
    if self.loss_chunk_size is not None and int(self.loss_chunk_size) <= 0:
      raise ValueError(f"TrainConfig.loss_chunk_size: got {self.loss_chunk_size}, expected a "
                       "positive number of tokens or None")
    if int(self.grad_accum_steps) <= 0:
      raise ValueError(f"TrainConfig.grad_accum_steps: got {self.grad_accum_steps}, expected >= 1")
    if self.moment_dtype is not None:
      jnp.dtype(self.moment_dtype)  # raises TypeError naming an unknown dtype


@struct.dataclass
class TrainState:
  """Everything a run needs to continue: saved and restored whole by `Checkpointer`."""

  step: jax.Array  # [] int32: optimizer steps taken
  params: nnx.State  # the trained parameters (the float32 master copy with `master_weights`)
  opt_state: optax.OptState
  rng: jax.Array  # [2] uint32: split once per step, for stochastic losses


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
  """Linear warm-up to the peak, then cosine decay to peak · final ratio at `total_steps`.

  Step s (counted from 0) uses peak · (s + 1) / warmup_steps during the warm-up, so the first
  update already moves the parameters.
  """
  peak = float(config.learning_rate)
  end = peak * float(config.final_learning_rate_ratio)
  warmup = max(int(config.warmup_steps), 0)
  decay = max(int(config.total_steps) - warmup, 1)

  def schedule(count):
    count = jnp.asarray(count, f32)
    warm = peak * (count + 1.0) / max(warmup, 1)
    progress = jnp.clip((count - warmup) / decay, 0.0, 1.0)
    cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(count < warmup, warm, cosine)

  return schedule


def _decay_mask(params):
  # Decay what scales a signal (matrices, conv taps); leave 1-D gains, decay rates and biases.
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """Global-norm clipping followed by AdamW on `learning_rate_schedule(config)`."""
  adamw = optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=config.weight_decay, mask=_decay_mask)
  if config.grad_clip_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)


def _cast(tree, dtypes):
  """Each leaf cast to its dtype in `dtypes` (a tree of dtypes, or one dtype for every float)."""
  if dtypes is None:
    return tree
  if not isinstance(dtypes, (nnx.State, dict)):
    return jax.tree.map(
        lambda x: x.astype(dtypes) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
  return jax.tree.map(lambda x, d: x.astype(d), tree, dtypes)


def _targets(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """tokens, the weights of their targets [b, t-1] and segment_ids (or None) of a batch.

  With segment_ids, a target in another document than the token that predicts it weighs 0.
  """
  tokens = jnp.asarray(batch["tokens"])
  mask = batch.get("mask")
  weights = (jnp.ones(tokens[:, 1:].shape, f32) if mask is None
             else jnp.asarray(mask, f32)[:, 1:])
  segment_ids = batch.get("segment_ids")
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != tokens.shape:
      raise ValueError(f"batch['segment_ids'] has shape {segment_ids.shape}, expected the "
                       f"tokens' {tokens.shape}")
    weights = jnp.where(segment_ids[:, 1:] == segment_ids[:, :-1], weights, 0.0)
  return tokens, weights, segment_ids


def _weighted_loss(params, graph: jit.Graph, rest, tokens, weights, segment_ids=None, *, plan):
  """Σ weights · nll of the model with `params` (weights already divided by the target count)."""
  model = graph.merge(_cast(params, plan.compute_dtypes), rest)
  hidden = model.hidden_states(tokens[:, :-1], remat=REMAT_POLICIES[plan.config.remat],
                               segment_ids=None if segment_ids is None else segment_ids[:, :-1])
  targets = tokens[:, 1:]
  if plan.config.loss_chunk_size is None:
    logits = model.logits(hidden)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(nll * weights)
  return weighted_nll(hidden, model.lm_head.weight[...], targets, weights,
                      int(plan.config.loss_chunk_size))


def _loss_and_grads(params, graph: jit.Graph, rest, batch: Batch, *, plan):
  """(mean loss, target count) and the gradient, over `grad_accum_steps` micro-batches."""
  tokens, weights, segment_ids = _targets(batch)
  count = weights.sum()
  weights = weights / jnp.maximum(count, 1.0)
  grad_fn = jax.value_and_grad(functools.partial(_weighted_loss, plan=plan))
  k = int(plan.config.grad_accum_steps)
  if k == 1:
    loss, grads = grad_fn(params, graph, rest, tokens, weights, segment_ids)
    return loss, count, grads

  def micro(carry, xs):
    loss, grads = grad_fn(params, graph, rest, *xs)
    acc_loss, acc = carry
    return (acc_loss + loss, jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads)), None

  split = lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:])
  # Accumulate in float32 whatever the parameters' dtype: k bf16 partial sums would round k times.
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, f32)), params)
  (loss, grads), _ = jax.lax.scan(micro, (jnp.zeros((), f32), zeros),
                                  (split(tokens), split(weights),
                                   None if segment_ids is None else split(segment_ids)))
  return loss, count, grads


def _train_step(graph: jit.Graph, state: TrainState, rest: nnx.State, batch: Batch, *, plan):
  loss, count, grads = _loss_and_grads(state.params, graph, rest, batch, plan=plan)
  moment_dtype = plan.config.moment_dtype
  updates, opt_state = plan.optimizer.update(
      _cast(grads, moment_dtype), state.opt_state, _cast(state.params, moment_dtype))
  params = optax.apply_updates(state.params, updates)  # p + u formed in float32, then cast
  rng, _ = jax.random.split(state.rng)
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "target_tokens": count}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics


def _eval_loss(graph: jit.Graph, params, rest, batch, *, plan):
  tokens, weights, segment_ids = _targets(batch)
  return _weighted_loss(params, graph, rest, tokens, weights / jnp.maximum(weights.sum(), 1.0),
                        segment_ids, plan=plan)


def _committed(tree, layout=None):
  # Restored checkpoints are committed to a device; a fresh state must be too, or the first step
  # after a resume compiles the train step a second time (jit keys its cache on placement). On a
  # mesh, the rest of the state (step, rng, optimizer counts) is replicated over it.
  device = jax.devices()[0] if layout is None else jax.sharding.NamedSharding(
      layout.mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(
      lambda x: x if getattr(x, "committed", False) else jax.device_put(x, device), tree)


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
  # Static structure closed over by the jitted step (no arrays): hashed by identity.
  config: TrainConfig
  optimizer: optax.GradientTransformation
  compute_dtypes: Any  # tree of the model's own dtypes, or None without master weights


class Trainer:
  """A jitted train step for one model structure and optimizer.

  Args:
    model: The model to train; its current parameters seed `init_state`. A bf16 model trains
      with float32 master weights and moments by default (`TrainConfig.master_weights`).
    config: Optimizer, schedule, precision and memory settings.
    wrt: Which parameters train (an NNX filter): `nnx.Param` for all of them, `nnx.LoRAParam`
      for the adapters of `nemojax.lora.apply_lora` only. The others are constant inputs.

  Raises:
    ValueError: `wrt` selects no parameter of `model`.
  """

  def __init__(self, model: NemotronH, config: TrainConfig = TrainConfig(), *,
               wrt: Any = nnx.Param):
    self.config = config
    self.graph, params, self._rest = jit.split(model, wrt, ...)
    if not jax.tree.leaves(params):
      raise ValueError(f"Trainer: wrt={wrt!r} selects no parameter of the model (for LoRA, call "
                       "nemojax.lora.apply_lora first)")
    compute_dtypes = jax.tree.map(lambda x: x.dtype, params) if config.master_weights else None
    # The model's own arrays (no copy: a float32 master copy kept here as well as in the state
    # would cost 4 bytes per parameter for the whole run); `init_state` copies them. An abstract
    # model (`nnx.eval_shape`) gives a trainer that can only be lowered (`lower`).
    self._params = params
    self.optimizer = make_optimizer(config)
    self.schedule = learning_rate_schedule(config)
    self._plan = _Plan(config, self.optimizer, compute_dtypes)
    # The plan is static structure (functions and dtypes, no arrays), so closing over it is
    # safe; the params and the frozen rest of the model are arguments. On an Explicit mesh the
    # new state keeps the old one's shardings and the metrics are replicated.
    self._step = jit.jit(functools.partial(_train_step, plan=self._plan), donate_argnums=(1,),
                         out_specs=lambda layout, state, *_: (sharding.same_specs(state), P()))
    self._eval = jit.jit(functools.partial(_eval_loss, plan=self._plan),
                         out_specs=lambda *_: P())

  def init_state(self, seed: int | None = None) -> TrainState:
    """A fresh state from the model's parameters (copied: later steps donate their buffers)."""
    return _committed(self._fresh_state(seed), self.graph.layout)

  def _fresh_state(self, seed: int | None = None, params=None) -> TrainState:
    master = f32 if self.config.master_weights else None
    params = jax.tree.map(  # always a copy: the steps donate it, the model keeps its own arrays
        lambda x: jnp.array(x, dtype=master if jnp.issubdtype(x.dtype, jnp.floating) else None,
                            copy=True), self._params if params is None else params)
    seed = self.config.seed if seed is None else seed
    opt_state = self.optimizer.init(_cast(params, self.config.moment_dtype))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      rng=jax.random.PRNGKey(seed))

  def abstract_state(self) -> TrainState:
    """Shapes and dtypes of a train state, for restoring a checkpoint without allocating.

    For a sharded model the leaves carry the target shardings (parameters and optimizer moments
    as the model's layout places them), so a state saved on one mesh restores onto this one.
    """
    shapes = jax.eval_shape(lambda p: self._fresh_state(None, p), self._params)
    layout = self.graph.layout
    if layout is None:
      return shapes
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, layout.tree_shardings(shapes))

  def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step; `state` is donated (do not use it afterwards).

    Returns:
      The new state and metrics: ``loss`` (before the update), ``grad_norm`` (before clipping)
      and ``target_tokens``.

    Raises:
      ValueError: `grad_accum_steps` does not divide the batch size.
    """
    rows = np.shape(batch["tokens"])[0]
    k = int(self.config.grad_accum_steps)
    if rows % k:
      raise ValueError(f"batch['tokens'] has {rows} rows, not a multiple of "
                       f"TrainConfig.grad_accum_steps={k}")
    return self._step(self.graph, state, self._rest, batch)

  def lower(self, batch_size: int, seq_len: int, *, segments: bool = False) -> jax.stages.Lowered:
    """The train step lowered for an abstract state and a batch of `batch_size` rows of
    `seq_len` tokens, i.e. seq_len − 1 inputs and their targets (no memory allocated: the model
    may be built with `nnx.eval_shape`).

    `.compile().memory_analysis()` of the result gives XLA's argument, output, alias (donated)
    and temporary bytes of the step: its peak memory short of fragmentation.
    """
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    batch = {"tokens": tokens, **({"segment_ids": tokens} if segments else {})}
    return self._step.lower(self.graph, self.abstract_state(), self._rest, batch)

  def evaluate(self, params: nnx.State, batch: Batch) -> jax.Array:
    """The masked next-token loss of `params` on `batch` (no update)."""
    return self._eval(self.graph, params, self._rest, batch)

  def model(self, state_or_params: TrainState | nnx.State) -> NemotronH:
    """The model with the given parameters, in the dtypes it was built with."""
    params = state_or_params.params if isinstance(state_or_params, TrainState) else state_or_params
    return self.graph.merge(_cast(params, self._plan.compute_dtypes), self._rest)


class Checkpointer:
  """Orbax checkpoints of a whole `TrainState`, one numbered directory per saved step.

  Saving is synchronous: the train step donates the state's buffers, so they must be on disk
  before the next step may reuse them.

  Args:
    directory: Where the step directories go (created if missing).
    max_to_keep: How many recent checkpoints to keep.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
    import orbax.checkpoint as ocp  # noqa: PLC0415  (heavy import, only when checkpointing)
    self._ocp = ocp
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    self._open = lambda: ocp.CheckpointManager(self.directory, options=options)
    self._manager = self._open()

  def latest_step(self) -> int | None:
    """The newest saved step, or None when the directory holds no checkpoint."""
    return self._manager.latest_step()

  def save(self, state: TrainState) -> None:
    """Saves `state` under its step number (overwrites nothing: a step saved twice is skipped)."""
    step = int(state.step)
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=self._ocp.args.StandardSave(state))
    self._manager.wait_until_finished()
    integrity.seal_dir(os.path.join(self.directory, str(step)))  # every file's size and SHA-256

  def restore(self, abstract_state: TrainState, step: int | None = None) -> TrainState:
    """Restores the state saved at `step` (when None: the newest intact one; damaged or incomplete
    steps are moved aside with a warning, see `integrity.restore_newest`).

    Raises:
      FileNotFoundError: No (intact) checkpoint in the directory.
    """
    args = self._ocp.args.StandardRestore(abstract_state)
    if step is not None:
      return self._manager.restore(step, args=args)

    def attempt(s: int) -> TrainState:  # a fresh manager: a failed restore leaves one confused
      manager = self._open()
      try:
        return manager.restore(s, args=args)
      finally:
        manager.close()

    found = integrity.restore_newest(self.directory, self._manager.all_steps(), attempt)
    self._manager.close()
    self._manager = self._open()  # sees the steps moved aside
    if found is None:
      raise FileNotFoundError(f"{self.directory}: no intact checkpoint to restore")
    return found[1]

  def close(self) -> None:
    self._manager.close()


def fit(
    trainer: Trainer,
    state: TrainState,
    batches: Callable[[int], Batch],
    num_steps: int,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    save_every: int | None = None,
    log_every: int = 10,
    progress: bool = True,
    description: str = "train",
) -> tuple[TrainState, list[dict[str, float]]]:
  """Runs the train step until `state.step == num_steps`, resuming from a checkpoint if present.

  Args:
    trainer: The jitted step.
    state: The state to start from when `checkpoint_dir` has no checkpoint (donated).
    batches: `batches(step)` returns the batch for that step; a function of the step (not an
      iterator) makes a resumed run see exactly the batches an uninterrupted one would.
    num_steps: Total steps of the run, counted from step 0.
    checkpoint_dir: If given, resume from its latest checkpoint and save there every `save_every`
      steps and at the end.
    save_every: Steps between checkpoints (default: only at the end).
    log_every: Steps between metric read-backs (each one waits for the device).
    progress: Show a tqdm bar with the loss and tokens per second.
    description: The bar's label.

  Returns:
    The final state and the logged metrics: dicts with ``step``, ``loss`` (mean since the last
    log), ``grad_norm``, ``learning_rate``, ``tokens_per_s`` and ``elapsed_s``.
  """
  checkpointer = Checkpointer(checkpoint_dir) if checkpoint_dir is not None else None
  if checkpointer is not None and checkpointer.latest_step() is not None:
    state = checkpointer.restore(trainer.abstract_state())
  start = int(state.step)
  history: list[dict[str, float]] = []
  bar = None
  if progress:
    from tqdm.auto import tqdm  # noqa: PLC0415
    bar = tqdm(total=num_steps, initial=start, desc=description, dynamic_ncols=True)
  t0 = t_log = time.perf_counter()
  pending: list[dict[str, jax.Array]] = []
  tokens_since = 0
  try:
    for step in range(start, num_steps):
      batch = batches(step)
      tokens_since += int(np.prod(np.shape(batch["tokens"])))
      state, metrics = trainer.step(state, batch)
      pending.append(metrics)
      done = step + 1
      if done % log_every == 0 or done == num_steps:
        host = jax.device_get(pending)
        now = time.perf_counter()
        record = {
            "step": done,
            "loss": float(np.mean([m["loss"] for m in host])),
            "grad_norm": float(np.mean([m["grad_norm"] for m in host])),
            "learning_rate": float(trainer.schedule(done - 1)),
            "tokens_per_s": tokens_since / max(now - t_log, 1e-9),
            "elapsed_s": now - t0,
        }
        history.append(record)
        pending, tokens_since, t_log = [], 0, now
        if bar is not None:
          bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                          lr=f"{record['learning_rate']:.2e}", refresh=False)
      if bar is not None:
        bar.update(1)
      if checkpointer is not None and save_every and done % save_every == 0:
        checkpointer.save(state)
    if checkpointer is not None:
      checkpointer.save(state)
  finally:
    if bar is not None:
      bar.close()
    if checkpointer is not None:
      checkpointer.close()
  return state, history
