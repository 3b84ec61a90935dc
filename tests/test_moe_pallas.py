"""The Mosaic GPU grouped-GEMM routed experts (kernels/moe/pallas_mosaic_gpu.py): the padded
layout, the kernel on Mosaic GPU's CPU interpreter against the dense oracle (groups of 0, 1, 37
and 38 rows, an overlapping last column tile), its lowering for CUDA at the Nano 30B-A3B shape
(the Mosaic GPU lowering rules run on the CPU), the dispatcher, shape errors, and on a Hopper GPU
the compiled kernel against ragged_dot."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax import moe as moe_lib
from nemojax import testing as T
from nemojax.kernels import moe as kmoe
from nemojax.kernels import platform
from nemojax.kernels.moe import pallas_mosaic_gpu as kernel
from nemojax.model import NemotronH

bf16 = jnp.bfloat16
NANO = dict(e=128, k=6, d=2688, f=1856)  # Nemotron 3 Nano 30B-A3B's routed experts


def _inputs(ids, d, f, e, seed=0):
  rng = np.random.default_rng(seed)
  m = ids.shape[0]
  x = jnp.asarray(rng.standard_normal((m, d)), bf16)
  w = jnp.asarray(rng.random(ids.shape), jnp.float32)
  up = jnp.asarray(rng.standard_normal((e, f, d)) / np.sqrt(d), bf16)
  down = jnp.asarray(rng.standard_normal((e, d, f)) / np.sqrt(f), bf16)
  return x, jnp.asarray(ids, jnp.int32), w, up, down


def _odd_groups():
  """38 rows, top-2 of 4 experts: groups of 0, 1, 37 and 38 pairs."""
  ids = np.full((38, 2), 3, np.int32)
  ids[:37, 0] = 2
  ids[37, 0] = 1
  return ids


def test_padded_layout_puts_each_tile_in_one_expert():
  ids = jnp.asarray(_odd_groups())
  tm = 64
  src, dest, tile_expert = kernel.padded_layout(ids, 4, tm)
  assert tile_expert.shape == (kernel.num_tiles(76, 4, tm),)
  np.testing.assert_array_equal(np.asarray(tile_expert)[:3], [1, 2, 3])
  assert (np.asarray(tile_expert)[3:] == -1).all()  # the static bound's unused tiles
  dest, src = np.asarray(dest), np.asarray(src)
  assert len(set(dest.tolist())) == dest.size  # every pair has its own padded row
  flat = np.asarray(ids).reshape(-1)
  np.testing.assert_array_equal(np.asarray(tile_expert)[dest // tm], flat)  # tile owns expert
  np.testing.assert_array_equal(src[dest], np.arange(flat.size) // 2)  # row reads its token


@pytest.mark.parametrize("config", [
    kernel.Config(tile_m=64, tile_n=128, num_stages=2),  # f = 192: the last tile overlaps
    kernel.Config(tile_m=128, tile_n=64, num_stages=3, down_dtype="bfloat16"),
    kernel.Config(tile_m=128, tile_n=128, num_stages=2, warp_specialized=True),
    kernel.Config(tile_m=16, tile_n=128, num_stages=2, transposed=True),
    kernel.Config(tile_m=32, tile_n=64, num_stages=3, transposed=True, down_dtype="bfloat16"),
])
def test_interpret_matches_dense_oracle(config):
  args = _inputs(_odd_groups(), 128, 192, 4)
  got = kernel.moe_ffn(*args, config=config, interpret=True)
  want = kmoe.moe_ffn_dense(*args)
  assert got.shape == (38, 128) and got.dtype == jnp.float32
  T.assert_close(got, want, "bfloat16", "kernel", str(config))


@pytest.mark.parametrize("ids", [[[5, 0, 2]], [[5, 0, 2], [0, 1, 5]]])
def test_interpret_decode_pair_tiles(ids):
  ids = np.array(ids, np.int32)
  assert kernel.per_pair(ids.shape[0], 3, 6)  # one tile per pair (expert 0 and 5 twice)
  args = _inputs(ids, 64, 128, 6, seed=1)
  got = kmoe.moe_ffn(*args, implementation="pallas")  # the dispatcher's path (interpreter)
  T.assert_close(got, kmoe.moe_ffn_dense(*args), "bfloat16", "kernel")


@pytest.mark.parametrize("m,config", [
    (1, None), (64, None), (8192, None),
    (64, kernel.Config(tile_m=64, tile_n=64, num_stages=4)),
    (8192, kernel.Config(tile_m=128, tile_n=256, num_stages=3, warp_specialized=True))])
def test_lowers_for_cuda_at_nano_shape(m, config):
  # Pallas -> Mosaic GPU lowering (wgmma operand transforms, TMA slices, layouts) runs on the CPU
  # when lowering for the "cuda" platform: what would fail first on the GPU fails here.
  e, k, d, f = NANO["e"], NANO["k"], NANO["d"], NANO["f"]
  S = jax.ShapeDtypeStruct
  args = (S((m, d), bf16), S((m, k), jnp.int32), S((m, k), jnp.float32), S((e, f, d), bf16),
          S((e, d, f), bf16))
  fn = functools.partial(kernel.moe_ffn, config=config, interpret=False)
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "custom_call" in text


def test_default_config_by_size():
  assert kernel.default_config(6, 128) == kernel.DECODE_CONFIG
  assert kernel.default_config(127, 128) == kernel.DECODE_CONFIG
  assert kernel.default_config(384, 128) == kernel.SMALL_BATCH_CONFIG
  assert kernel.default_config(6144, 128) == kernel.PREFILL_CONFIG
  assert kernel.default_config(49152, 128) == kernel.LARGE_PREFILL_CONFIG
  assert kernel.default_config(49152, 128, width=192) == kernel.PREFILL_CONFIG  # < 256 wide
  assert kernel.supports(d=2688, f=1856, dtype=bf16)
  assert not kernel.supports(d=2688, f=1856, dtype=jnp.float32)
  assert not kernel.supports(d=2688, f=1850, dtype=bf16)


def test_dispatcher_keeps_xla_off_hopper():
  info = dict(num_rows=1, top_k=6, num_experts=128, d=2688, f=1856, dtype=bf16)
  if not platform.mosaic_gpu_available():
    assert kmoe.resolve_implementation(None, **info) == "gather"
    assert kmoe.resolve_implementation(None, **{**info, "num_rows": 64}) == "ragged_dot"
  assert kmoe.resolve_implementation("pallas", **info) == "pallas"



def test_dispatcher_on_hopper_needs_verified_tracing_kernel(pretend_hopper, monkeypatch):
  info = dict(num_rows=64, top_k=6, num_experts=128, d=2688, f=1856, dtype=bf16)
  monkeypatch.setattr(kernel, "HARDWARE_VERIFIED", False)
  assert kmoe.resolve_implementation(None, **info) == "ragged_dot"  # not verified on hardware
  monkeypatch.setattr(kernel, "HARDWARE_VERIFIED", True)
  assert kmoe.resolve_implementation(None, **info) == "pallas"  # it traces here
  assert kmoe.resolve_implementation(None, **{**info, "f": 1850}) == "ragged_dot"  # unsupported
  assert kmoe.resolve_implementation(None, **{**info, "dtype": jnp.float32}) == "ragged_dot"
  platform.reset_fallbacks()

  def broken(*args, **kwargs):
    raise KeyError("moved API")
  monkeypatch.setattr(kernel, "moe_ffn", broken)
  with pytest.warns(RuntimeWarning, match="moe.pallas_mosaic_gpu.*KeyError.*XLA"):
    assert kmoe.resolve_implementation(None, **info) == "ragged_dot"


def test_unsupported_shapes_error_in_one_line():
  args = _inputs(np.array([[0, 1]], np.int32), 96, 128, 2)  # d = 96: not a multiple of 64
  with pytest.raises(ValueError, match=r"moe_ffn \(pallas\): needs bf16 .* up \(2, 128, 96\)"):
    kernel.moe_ffn(*args, interpret=True)
  x, ids, w, up, down = _inputs(np.array([[0, 1]], np.int32), 64, 128, 2)
  with pytest.raises(ValueError, match="needs bf16"):
    kernel.moe_ffn(x, ids, w, up.astype(jnp.float32), down.astype(jnp.float32), interpret=True)
  with pytest.raises(ValueError, match="grouped_matmul"):
    kernel.grouped_matmul(x[:, :64], up, jnp.zeros((1,), jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="tile_m must be one of"):
    kernel.Config(tile_m=32)
  with pytest.raises(ValueError, match="cannot be combined"):
    kernel.Config(tile_m=16, transposed=True, warp_specialized=True)


@pytest.mark.gpu
@pytest.mark.parametrize("m,config", [
    (1, None), (64, None), (1024, None), (64, kernel.Config(64, 64, 4)), (24, None),
    (1024, kernel.Config(128, 256, 3, warp_specialized=True)), (6000, None)])
def test_compiled_kernel_matches_ragged_dot_on_hopper(m, config):
  e, k, d, f = NANO["e"], NANO["k"], NANO["d"], NANO["f"]
  rng = np.random.default_rng(m)
  ids = np.stack([rng.choice(e, k, replace=False) for _ in range(m)])
  args = _inputs(ids, d, f, e, seed=m)
  got = kernel.moe_ffn(*args, config=config)
  want = kmoe.moe_ffn_sorted(*args)
  T.assert_close(got, want, "bfloat16", "kernel", f"m={m} {config}")


@pytest.mark.slow  # ~20 s: builds a tiny model, runs the kernel on the interpreter
def test_benchmark_script_smoke(tmp_path):
  root = Path(__file__).resolve().parents[1]
  proc = subprocess.run(
      [sys.executable, "benchmarks/moe.py", "--smoke", "--parts", "ffn,decode", "--tokens", "4",
       "--batches", "1", "--model-impls", "xla", "--out", str(tmp_path)], cwd=root,
      capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "ERROR" not in proc.stdout, proc.stdout[-3000:]
  res = json.loads((tmp_path / "moe.json").read_text())
  assert res["ffn"]["m4"]["pallas"]["ok"] and res["ffn"]["m4"]["gather"]["ok"]
  # The decode part's kernel path is the model's (test_model_with_kernel_matches_xla).
  decode = res["decode"]["xla_b1_ctx32"]
  assert decode["finite"]
  # One row: each MoE layer's router picks exactly top-k distinct experts, which is also the
  # uniform expectation at batch 1; the roofline then counts them.
  assert decode["experts_per_layer"] and all(
      v == pytest.approx(decode["uniform_experts"]) for v in decode["experts_per_layer"])
  assert decode["roofline_ms"] == pytest.approx(decode["roofline_uniform_ms"])


def test_model_with_kernel_matches_xla():
  cfg = T.MOE_CONFIGS["moe"].replace(hidden_size=128, moe_intermediate_size=192)
  model = NemotronH(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 5))
  moe_lib.set_implementation(model, "xla")
  want = np.asarray(model(ids), np.float32)
  moe_lib.set_implementation(model, "pallas")
  got = np.asarray(model(ids), np.float32)
  T.assert_close(got, want, "bfloat16", "model")
