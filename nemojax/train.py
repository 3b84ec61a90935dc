"""Training a Nemotron-H model with optax: masked next-token loss, AdamW, orbax checkpoints.

With tokens x [b, t] and a loss mask m [b, t] (1 where a token is a training target, e.g. the
assistant's tokens of a chat transcript):

    logits = model(x[:, :-1])                                    # [b, t-1, V] float32
    nll    = −log softmax(logits)[x[:, 1:]]                      # [b, t-1]
    loss   = Σ m[:, 1:] · nll / max(Σ m[:, 1:], 1)               # mean over target tokens

The optimizer is AdamW (decoupled weight decay on matrices only: embeddings, projections, conv
taps; not on norm scales, A_log, D, dt_bias or biases) behind global-norm gradient clipping, with a
linear warm-up to the peak learning rate followed by a cosine decay.

The jit boundary follows DESIGN point 8: the NNX model is split once into a graph definition and
its parameter state; the train step is a plain `jax.jit` function of the whole `TrainState`
(params, optimizer state, step, rng), which it donates, and merges the model inside. The same code
runs on CPU, GPU and TPU. `Checkpointer` saves and restores that whole state with orbax, so `fit`
resumes a run exactly where it stopped when its batches are a function of the step number.

Example:
  trainer = Trainer(NemotronH(config, dtype=jnp.float32), TrainConfig(total_steps=1000))
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
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from nemojax import jit, sharding
from nemojax.convert import integrity
from nemojax.model import NemotronH

__all__ = [
    "Checkpointer", "TrainConfig", "TrainState", "Trainer", "fit", "learning_rate_schedule",
    "make_optimizer", "next_token_loss",
]

Batch = Mapping[str, Any]  # {"tokens": int [b, t], "mask": optional float/bool [b, t]}
f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimizer and schedule hyper-parameters.

  Attributes:
    learning_rate: Peak learning rate, reached after `warmup_steps`.
    warmup_steps: Steps of linear warm-up from 0.
    total_steps: Length of the schedule; the cosine decay ends here.
    final_learning_rate_ratio: The cosine decays to `learning_rate` times this.
    weight_decay: AdamW's decoupled weight decay, applied to matrices only.
    b1, b2, eps: Adam's moment decay rates and epsilon.
    grad_clip_norm: Gradients are rescaled to at most this global norm (None: no clipping).
    seed: Seeds the train state's rng.
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


@struct.dataclass
class TrainState:
  """Everything a run needs to continue: saved and restored whole by `Checkpointer`."""

  step: jax.Array  # [] int32: optimizer steps taken
  params: nnx.State  # the model's nnx.Param state
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


def next_token_loss(logits: jax.Array, tokens: jax.Array,
                    mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Mean next-token cross-entropy over the masked targets.

  Args:
    logits: [b, t-1, V] logits of `tokens[:, :-1]`.
    tokens: [b, t] token ids.
    mask: [b, t] weights; position i counts as the target of position i-1 when mask[:, i] > 0.
      None: every next token counts.

  Returns:
    (loss, number of target tokens), both float32 scalars.
  """
  targets = tokens[:, 1:]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(f32), targets)  # [b, t-1]
  weights = jnp.ones_like(nll) if mask is None else jnp.asarray(mask[:, 1:], f32)
  count = weights.sum()
  return (nll * weights).sum() / jnp.maximum(count, 1.0), count


def _loss(params, graph: jit.Graph, rest, batch):
  model = graph.merge(params, rest)
  tokens = batch["tokens"]
  logits = model(tokens[:, :-1])
  return next_token_loss(logits, tokens, batch.get("mask"))


def _train_step(graph: jit.Graph, state: TrainState, rest: nnx.State, batch: Batch, *,
                optimizer: optax.GradientTransformation):
  (loss, count), grads = jax.value_and_grad(_loss, has_aux=True)(
      state.params, graph, rest, batch)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  rng, _ = jax.random.split(state.rng)
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "target_tokens": count}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics


def _eval_loss(graph: jit.Graph, params, rest, batch):
  return _loss(params, graph, rest, batch)[0]


def _committed(tree, layout=None):
  # Restored checkpoints are committed to a device; a fresh state must be too, or the first step
  # after a resume compiles the train step a second time (jit keys its cache on placement). On a
  # mesh, the rest of the state (step, rng, optimizer counts) is replicated over it.
  device = jax.devices()[0] if layout is None else jax.sharding.NamedSharding(
      layout.mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(
      lambda x: x if getattr(x, "committed", False) else jax.device_put(x, device), tree)


class Trainer:
  """A jitted train step for one model structure and optimizer.

  Args:
    model: The model to train; its current parameters seed `init_state`. Train in float32 on CPU
      (build it with ``dtype=jnp.float32``); bf16 weights train poorly with AdamW's small updates.
    config: Optimizer and schedule settings.
  """

  def __init__(self, model: NemotronH, config: TrainConfig = TrainConfig()):
    self.config = config
    self.graph, self._params, self._rest = jit.split(model, nnx.Param, ...)
    self.optimizer = make_optimizer(config)
    self.schedule = learning_rate_schedule(config)
    # The optimizer is static structure (functions, no arrays), so closing over it is safe; the
    # params and any non-parameter state (none in NemotronH) are arguments.
    # On an Explicit mesh the new state keeps the old one's shardings; metrics are replicated.
    self._step = jit.jit(functools.partial(_train_step, optimizer=self.optimizer),
                         donate_argnums=(1,),
                         out_specs=lambda layout, state, *_: (sharding.same_specs(state), P()))
    self._eval = jit.jit(_eval_loss, out_specs=lambda *_: P())

  def init_state(self, seed: int | None = None) -> TrainState:
    """A fresh state from the model's parameters (copied: later steps donate their buffers)."""
    return _committed(self._fresh_state(seed), self.graph.layout)

  def _fresh_state(self, seed: int | None = None) -> TrainState:
    params = jax.tree.map(jnp.copy, self._params)
    seed = self.config.seed if seed is None else seed
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.optimizer.init(params), rng=jax.random.PRNGKey(seed))

  def abstract_state(self) -> TrainState:
    """Shapes and dtypes of a train state, for restoring a checkpoint without allocating.

    For a sharded model the leaves carry the target shardings (parameters and optimizer moments
    as the model's layout places them), so a state saved on one mesh restores onto this one.
    """
    shapes = jax.eval_shape(self._fresh_state)
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
    """
    return self._step(self.graph, state, self._rest, batch)

  def evaluate(self, params: nnx.State, batch: Batch) -> jax.Array:
    """The masked next-token loss of `params` on `batch` (no update)."""
    return self._eval(self.graph, params, self._rest, batch)

  def model(self, state_or_params: TrainState | nnx.State) -> NemotronH:
    """The model with the given parameters (shares their buffers)."""
    params = state_or_params.params if isinstance(state_or_params, TrainState) else state_or_params
    return self.graph.merge(params, self._rest)


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
