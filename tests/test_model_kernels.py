"""The whole model with the Pallas SSD kernel (Mosaic GPU interpreter on CPU) against XLA.

The kernel tests check the scan alone; here the kernel sits inside the Mamba layers, behind the
dispatcher, with the conv, gate and norm around it, at a length that is not a multiple of the
block, with batch 2, and continuing from a cached state (the kernel's initial-state path).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemojax
from nemojax import testing as T


def _model(ssd_implementation):
  cfg = nemojax.NemotronHConfig.tiny(
      hybrid_override_pattern="M-", mamba_num_heads=2, mamba_head_dim=64, ssm_state_size=128,
      n_groups=1, chunk_size=128)
  return nemojax.NemotronH(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(3),
                           ssd_implementation=ssd_implementation)


@pytest.mark.slow  # ~15 s: the kernel's interpreter inside a whole model
def test_model_with_the_pallas_ssd_equals_xla():
  ids = jnp.asarray(np.random.default_rng(5).integers(0, 256, (2, 150)), jnp.int32)
  first, second = {}, {}
  for impl in ("xla", "pallas"):
    model = _model(impl)
    cache = model.init_cache(2, 256)
    out, cache = model(ids[:, :130], cache=cache)     # two blocks, the second one partial
    first[impl] = np.asarray(out, np.float32)
    out, _ = model(ids[:, 130:], cache=cache)         # continues from the kernel's final state
    second[impl] = np.asarray(out, np.float32)
  assert np.isfinite(first["pallas"]).all() and np.isfinite(second["pallas"]).all()
  T.assert_close(first["pallas"], first["xla"], "bfloat16", "model", "prefill")
  T.assert_close(second["pallas"], second["xla"], "bfloat16", "model", "from a cached state")
  # The two paths must not be the same computation in disguise: the kernel rounds differently.
  assert T.rel_err(first["pallas"], first["xla"]) > 0
