"""Packed sequences: documents laid end to end in one row with `segment_ids` behave exactly as
if each ran alone (the SSD, the causal conv, attention, the logits, the loss and its gradient)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax import testing as T
from nemojax.config import NemotronHConfig
from nemojax.kernels.attention import api as attention_api
from nemojax.kernels.ssd import api as ssd_api
from nemojax.kernels.ssd import reference
from nemojax.model import NemotronH
from nemojax.train import TrainConfig, Trainer

# Two rows with different packings; lengths that are not multiples of the chunk (8), documents
# that cross chunk ends, start mid-chunk, and (row 1) a one-token document and a reused id.
LENGTHS = ([7, 13, 22], [1, 20, 9, 12])
IDS = ([5, 2, 9], [3, 4, 3, 0])
T_LEN = 42


def _segment_ids():
  return np.stack([np.repeat(ids, lens) for ids, lens in zip(IDS, LENGTHS)]).astype(np.int32)


def _spans(row):
  """(start, stop) of each document of `row`."""
  ends = np.cumsum(LENGTHS[row])
  return list(zip(ends - np.array(LENGTHS[row]), ends))


def _ssd_inputs(rng, b, t, h=4, p=6, g=2, n=5):
  x = rng.standard_normal((b, t, h, p)).astype(np.float32)
  dt = np.log1p(np.exp(rng.standard_normal((b, t, h)) - 1.0)).astype(np.float32)
  A = -np.exp(rng.uniform(-1.0, 1.0, h)).astype(np.float32)
  B = rng.standard_normal((b, t, g, n)).astype(np.float32)
  C = rng.standard_normal((b, t, g, n)).astype(np.float32)
  D = rng.standard_normal(h).astype(np.float32)
  s0 = rng.standard_normal((b, h, p, n)).astype(np.float32)
  return x, dt, A, B, C, D, s0


@pytest.mark.parametrize("scan", ["chunked", "naive"])
def test_ssd_with_segments_equals_documents_alone(scan):
  x, dt, A, B, C, D, s0 = _ssd_inputs(np.random.default_rng(0), 2, T_LEN)
  seg = _segment_ids()
  run = ((lambda *a: reference.ssd_chunked(*a, chunk_size=8)) if scan == "chunked"
         else reference.ssd_naive)
  y, final = run(x, dt, A, B, C, D, s0, seg)
  for row in range(2):
    for i, (lo, hi) in enumerate(_spans(row)):
      xd, dtd, Bd, Cd = (v[row:row + 1, lo:hi] for v in (x, dt, B, C))
      # The initial state belongs to the first document only.
      y_doc, s_doc = reference.ssd_naive(xd, dtd, A, Bd, Cd, D,
                                         s0[row:row + 1] if i == 0 else None)
      T.assert_close(y[row:row + 1, lo:hi], y_doc, "float32", "same")
    T.assert_close(final[row:row + 1], s_doc, "float32", "same")


def test_ssd_chunked_gradient_with_segments_is_finite_and_matches_naive():
  x, dt, A, B, C, D, s0 = _ssd_inputs(np.random.default_rng(1), 2, T_LEN)
  seg = _segment_ids()
  loss = lambda fn: (lambda x, dt, B: jnp.sum(jnp.sin(fn(x, dt, A, B, C, D, s0, seg)[0])))
  g = jax.grad(loss(lambda *a: reference.ssd_chunked(*a, chunk_size=8)), (0, 1, 2))(x, dt, B)
  g_ref = jax.grad(loss(reference.ssd_naive), (0, 1, 2))(x, dt, B)
  for a, e in zip(g, g_ref):
    assert np.isfinite(np.asarray(a)).all()
    T.assert_close(a, e, "float32", "same")


def test_ssd_dispatcher_passes_segments_on(monkeypatch):
  x, dt, A, B, C, D, s0 = _ssd_inputs(np.random.default_rng(2), 2, T_LEN)
  seg = _segment_ids()
  called = []
  real = reference.ssd_chunked
  monkeypatch.setattr(reference, "ssd_chunked",
                      lambda *a, **k: called.append(a[7]) or real(*a, **k))
  # Shapes the kernel does not take: XLA, with the documents (the Pallas kernels take them too;
  # tests/test_ssd_pallas.py checks packed rows there).
  monkeypatch.setattr(ssd_api.platform, "mosaic_gpu_available", lambda: True)
  y, _ = ssd_api.ssd(x, dt, A, B, C, D, initial_state=s0, chunk_size=8, segment_ids=seg)
  assert called and called[0] is seg
  T.assert_close(y, reference.ssd_naive(x, dt, A, B, C, D, s0, seg)[0], "float32", "same")
  with pytest.raises(ValueError, match="chunk_size"):  # asked for, the kernel says what it lacks
    ssd_api.ssd(x, dt, A, B, C, D, chunk_size=8, implementation="pallas", segment_ids=seg)


def _qkv(rng, b, t, h=4, kv=2, d=8):
  q = rng.standard_normal((b, t, h, d)).astype(np.float32)
  k = rng.standard_normal((b, kv, t, d)).astype(np.float32)
  v = rng.standard_normal((b, kv, t, d)).astype(np.float32)
  return q, k, v


@pytest.mark.parametrize("key_block", [16, 1024])  # blocked (3 blocks) and split-K schedules
def test_attention_with_segments_equals_documents_alone(key_block, monkeypatch):
  q, k, v = _qkv(np.random.default_rng(3), 2, T_LEN)
  seg = _segment_ids()
  start = np.zeros(2, np.int32)
  # Full forward: XLA even where the kernel would be chosen for a prefill.
  monkeypatch.setattr(attention_api.platform, "mosaic_gpu_available", lambda: True)
  o = attention_api.attention(q, k, v, 0, start, key_block=key_block, segment_ids=seg)
  for row in range(2):
    for lo, hi in _spans(row):
      o_doc = attention_api.attention(q[row:row + 1, lo:hi], k[row:row + 1, :, lo:hi],
                                      v[row:row + 1, :, lo:hi], 0, start[:1], implementation="xla")
      T.assert_close(o[row:row + 1, lo:hi], o_doc, "float32", "same")


def test_attention_dispatcher_refuses_segments_off_the_xla_full_forward():
  q, k, v = _qkv(np.random.default_rng(4), 2, T_LEN)
  seg, start = _segment_ids(), np.zeros(2, np.int32)
  with pytest.raises(ValueError, match="segment_ids"):
    attention_api.attention(q, k, v, 0, start, implementation="pallas", segment_ids=seg)
  with pytest.raises(ValueError, match="segment_ids"):
    attention_api.attention(q, k, v, 0, start, T_LEN, segment_ids=seg)


VOCAB = 64
CONFIG = NemotronHConfig.tiny(vocab_size=VOCAB, hybrid_override_pattern="M*-M")


@pytest.fixture(scope="module")
def model():
  return NemotronH(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(0), ssd_implementation="xla")


def _tokens():
  return np.random.default_rng(5).integers(3, VOCAB, (2, T_LEN)).astype(np.int32)


def test_model_logits_of_packed_rows_equal_documents_alone(model):
  tokens, seg = _tokens(), _segment_ids()
  logits = model(tokens, segment_ids=seg)
  for row in range(2):
    for lo, hi in _spans(row):
      T.assert_close(logits[row:row + 1, lo:hi], model(tokens[row:row + 1, lo:hi]),
                     "float32", "same", f"row {row} document [{lo}, {hi})")
  with pytest.raises(ValueError, match="segment_ids"):
    model(tokens, segment_ids=seg[:, :-1])


def test_packed_loss_and_gradients_equal_documents_trained_separately(model):
  """The packed batch against one row per document (right-padded, pads masked): same loss, same
  target count, same gradient, i.e. Σ over documents weighted by their target counts."""
  tokens, seg = _tokens(), _segment_ids()
  docs = [tokens[row, lo:hi] for row in range(2) for lo, hi in _spans(row)]
  width = max(len(d) for d in docs)
  sep_tokens = np.zeros((len(docs), width), np.int32)
  sep_mask = np.zeros((len(docs), width), np.float32)
  for i, d in enumerate(docs):
    sep_tokens[i, :len(d)], sep_mask[i, :len(d)] = d, 1.0
  packed = {"tokens": tokens, "mask": np.ones_like(tokens, np.float32), "segment_ids": seg}
  separate = {"tokens": sep_tokens, "mask": sep_mask}
  trainer = Trainer(model, TrainConfig(loss_chunk_size=16))
  params = trainer.init_state().params
  loss_fn = lambda batch: jax.value_and_grad(lambda p: trainer.evaluate(p, batch))(params)
  (loss, grads), (loss_sep, grads_sep) = loss_fn(packed), loss_fn(separate)
  T.assert_close(loss, loss_sep, "float32", "same", "loss")
  for (path, g), g_sep in zip(jax.tree_util.tree_leaves_with_path(grads),
                              jax.tree.leaves(grads_sep)):
    T.assert_close(g, g_sep, "float32", "same", jax.tree_util.keystr(path))
  # Without segment_ids the documents would see each other: the test can tell.
  leaky = trainer.evaluate(params, {"tokens": tokens, "mask": (seg == np.roll(seg, 1, axis=1))
                                   .astype(np.float32)})
  assert abs(float(leaky) - float(loss)) > T.tolerance("float32", "independent")


def test_train_step_with_accumulation_splits_segment_ids(model):
  tokens, seg = _tokens(), _segment_ids()
  packed = {"tokens": tokens, "segment_ids": seg}
  trainer = Trainer(model, TrainConfig(grad_accum_steps=2, loss_chunk_size=16))
  expected = trainer.evaluate(trainer.init_state().params, packed)
  _, metrics = trainer.step(trainer.init_state(), packed)
  T.assert_close(metrics["loss"], expected, "float32", "same", "loss")
  # Targets: every next token but the first of each document.
  assert int(metrics["target_tokens"]) == 2 * (T_LEN - 1) - sum(len(n) - 1 for n in LENGTHS)
  assert np.isfinite(float(metrics["grad_norm"]))
