"""Will a request fit? A lower bound on the device memory of a generation, checked before compiling.

    need = cache                      # conv + fp32 SSM states per Mamba layer, K/V per attention
         + loop buffers               # tokens and reasoning counts: 2 · b · n · 4 bytes
         + max(prefill chunk, decode step)
    prefill chunk ≈ b · chunk · (in_proj_dim · 4 + hidden · 2 · itemsize)   # projections
    decode step   ≈ 3 · b · V · 4                                            # logits, sort, probs

The estimate leaves out what depends on the kernels (attention scores, SSD chunk matrices), so it
is a lower bound: a request refused here cannot run; one accepted may still run out of memory.

Free memory: `memory_stats()` of the first device ('bytes_limit' − 'bytes_in_use') where the
backend reports it (GPU, TPU). On CPU (no memory stats) the host's available memory
(`MemAvailable` in /proc/meminfo) stands in; where neither is known (CPU off Linux) no check is
made.
"""

from __future__ import annotations

import jax
import numpy as np

from nemojax.cache import cache_bytes
from nemojax.config import NemotronHConfig

GiB = 2**30


def need_bytes(config: NemotronHConfig, dtype, *, batch: int, cache_len: int, buffer_len: int,
               chunk: int) -> dict[str, int]:
  """The lower bound's parts, in bytes: cache, buffers and step."""
  itemsize = np.dtype(dtype).itemsize
  prefill = batch * chunk * (config.in_proj_dim * 4 + config.hidden_size * 2 * itemsize)
  decode = 3 * batch * config.vocab_size * 4
  return {"cache": cache_bytes(config, batch, cache_len, dtype),
          "buffers": 2 * batch * buffer_len * 4,
          "step": max(prefill, decode)}


def free_bytes() -> int | None:
  """Free device memory in bytes (see the module docstring), or None when unknown."""
  device = jax.devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001  (some backends raise instead of returning None)
    stats = None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  if device.platform != "cpu":
    return None
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    return None
  return None


def check_fits(config: NemotronHConfig, dtype, *, batch: int, cache_len: int, buffer_len: int,
               chunk: int, max_new_tokens: int, cache_size_given: bool) -> None:
  """Raises a one-line ValueError naming max_new_tokens or cache_size when the request cannot fit.
  """
  free = free_bytes()
  if free is None:
    return
  parts = need_bytes(config, dtype, batch=batch, cache_len=cache_len, buffer_len=buffer_len,
                     chunk=chunk)
  need = sum(parts.values())
  if need <= free:
    return
  knob = (f"cache_size={cache_len}" if cache_size_given
          else f"max_new_tokens={max_new_tokens} ({cache_len} cache positions)")
  detail = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in parts.items())
  raise ValueError(
      f"{knob} for {batch} prompt(s) needs at least {need:,} bytes ({need / GiB:.2f} GiB: "
      f"{detail}) but {free:,} bytes ({free / GiB:.2f} GiB) are free; lower max_new_tokens, "
      "cache_size or the batch")
