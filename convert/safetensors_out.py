"""Writing HF-layout safetensors shards one tensor at a time.

safetensors is 8 bytes of little-endian header length, a JSON header (`{name: {dtype, shape,
data_offsets: [begin, end]}}` plus `__metadata__`, padded with spaces to a multiple of 8) and the
raw little-endian bytes of every tensor back to back. Since every shape and dtype is known before
any data is read, the whole layout is planned first: each shard file is created with its final
header and size, then every tensor is written at its offset as it arrives, in whatever order the
reader produces them. Host memory holds one tensor, not one shard.

Shards follow `save_pretrained`: tensors in model order, a new shard when the next tensor would push
the current one past `max_shard_size` (a larger tensor gets a shard of its own), named
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, or `model.safetensors`
alone when everything fits in one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys

import numpy as np

from nemojax.convert import atomic, hf

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
  """Bytes from an int or a string like "5GB" (10**9, as transformers counts) or "512MiB".

  Raises:
    ValueError: an unreadable or non-positive size.
  """
  if isinstance(size, int) and not isinstance(size, bool):
    n = size
  else:
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m or m.group(2) not in _UNITS:
      raise ValueError(f"max shard size {size!r}: expected bytes or a size such as '5GB', "
                       "'500MB' or '2GiB'")
    n = int(float(m.group(1)) * _UNITS[m.group(2)])
  if n <= 0:
    raise ValueError(f"max shard size {size!r}: must be positive")
  return n


@dataclasses.dataclass(frozen=True)
class _Slot:
  file: str  # shard file name
  offset: int  # absolute byte offset of the data in the file
  num_bytes: int
  dtype: str  # safetensors dtype string
  shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each tensor goes: shard files, their headers and sizes."""

  slots: dict[str, _Slot]
  headers: dict[str, bytes]  # file name -> 8-byte length + padded JSON header
  sizes: dict[str, int]  # file name -> total file size

  @property
  def files(self) -> list[str]:
    return list(self.headers)

  @property
  def num_bytes(self) -> int:
    return sum(s.num_bytes for s in self.slots.values())


def plan(tensors: list[tuple[str, tuple[int, ...], str]], max_shard_size: int | str) -> Layout:
  """Plans shards for (name, shape, safetensors dtype) triples given in model order."""
  limit = parse_size(max_shard_size)
  shards: list[list[tuple[str, tuple[int, ...], str, int]]] = [[]]
  size = 0
  for name, shape, dtype in tensors:
    n = int(np.prod(shape, dtype=np.int64)) * hf.DTYPES[dtype].itemsize
    if shards[-1] and size + n > limit:
      shards.append([])
      size = 0
    shards[-1].append((name, tuple(shape), dtype, n))
    size += n
  names = ([hf.SINGLE_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  slots, headers, sizes = {}, {}, {}
  for file, shard in zip(names, shards):
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, shape, dtype, n in shard:
      header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
      pos += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    headers[file] = len(text).to_bytes(8, "little") + text
    sizes[file] = len(headers[file]) + pos
    for name, shape, dtype, n in shard:
      begin = header[name]["data_offsets"][0]
      slots[name] = _Slot(file, len(headers[file]) + begin, n, dtype, shape)
  return Layout(slots=slots, headers=headers, sizes=sizes)


class ShardWriter:
  """Creates the planned shard files in `directory`, then fills them tensor by tensor."""

  def __init__(self, directory: str, layout: Layout):
    if sys.byteorder != "little":
      raise OSError("writing safetensors needs a little-endian host")
    self._dir = directory
    self._layout = layout
    self._written: set[str] = set()
    for file, head in layout.headers.items():
      with open(os.path.join(directory, file), "wb") as f:
        f.write(head)
        f.truncate(layout.sizes[file])

  def write(self, name: str, array: np.ndarray) -> None:
    atomic.check_interrupted()
    slot = self._layout.slots.get(name)
    if slot is None:
      raise ValueError(f"tensor {name!r} is not in the shard plan")
    if name in self._written:
      raise ValueError(f"tensor {name!r} written twice")
    arr = np.ascontiguousarray(array)
    if (tuple(arr.shape) != slot.shape or arr.dtype != hf.DTYPES[slot.dtype]
        or arr.nbytes != slot.num_bytes):
      raise ValueError(f"tensor {name!r}: got {tuple(arr.shape)} {arr.dtype}, the plan says "
                       f"{slot.shape} {slot.dtype}")
    with open(os.path.join(self._dir, slot.file), "r+b") as f:
      f.seek(slot.offset)
      f.write(memoryview(arr.reshape(-1).view(np.uint8)))
    self._written.add(name)

  def finish(self) -> None:
    """Checks every tensor was written and writes the index (for more than one shard)."""
    missing = sorted(set(self._layout.slots) - self._written)
    if missing:
      raise ValueError(f"{self._dir}: tensors never written: {missing[:3]}")
    for file, size in self._layout.sizes.items():
      got = os.path.getsize(os.path.join(self._dir, file))
      if got != size:
        raise OSError(f"{os.path.join(self._dir, file)}: {got} bytes on disk, expected {size}")
    if len(self._layout.headers) > 1:
      index = {
          "metadata": {"total_size": self._layout.num_bytes,
                       "total_parameters": sum(int(np.prod(s.shape, dtype=np.int64))
                                               for s in self._layout.slots.values())},
          "weight_map": {n: self._layout.slots[n].file for n in sorted(self._layout.slots)},
      }
      with open(os.path.join(self._dir, hf.INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
