"""`LeanReader`: gguf-py's `GGUFReader` without a numpy object per metadata array element.

gguf-py builds a `ReaderField` with one memory-mapped view per element of an array field
(two per string). A ds4 vocabulary is 129280 tokens, as many types and ~127k merges: about
640k `np.memmap` views, 410 MiB of a process's anonymous memory for as long as the reader
lives (the GGUF source keeps its reader for the tensors) and ~7 s to build. `LeanReader`
keeps the same `ReaderField`s, with the same `parts` indexing and `data` indices, so
`field.contents()`, `field.parts[i]` and gguf-py's writer see what they saw before, but an
array field's element parts are made on demand from one offset table, and views are plain
ndarrays over the map (no per-view attribute dict). Measured on the 12-layer Flash-dims
fixture: 410 -> a few MiB, 6.9 -> ~0.3 s (docs/benchmarks.md).

Written here because gguf-py offers no lazy mode; it subclasses the pinned gguf-py
(`gguf>=0.19,<0.20`) and overrides only the field parser (`_build_fields`,
`_get_field_parts`) and the view helper (`_get`).
"""

from __future__ import annotations

from collections.abc import Sequence
import numpy as np
import gguf
from gguf import GGUFValueType as VT
from gguf.gguf_reader import ReaderField


class _ArrayParts(Sequence):
  """A field's `parts` list: `head` (key length, key, type, item type, count) and then each
  element's parts, made when indexed: (length, bytes) per string, one 1-element view per
  scalar."""

  def __init__(self, reader: "LeanReader", head: list, itype: VT, n: int,
               starts: np.ndarray | None = None, first: int = 0):
    # Element k starts at starts[k] (strings) or at first + k * itemsize (scalars).
    self._reader, self._head, self._itype, self._n = reader, head, itype, n
    self._starts, self._first = starts, first
    self._per = 2 if itype == VT.STRING else 1

  def __len__(self) -> int:
    return len(self._head) + self._per * self._n

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    i = i + len(self) if i < 0 else i
    if not 0 <= i < len(self):
      raise IndexError(i)
    if i < len(self._head):
      return self._head[i]
    item, which = divmod(i - len(self._head), self._per)
    if self._itype == VT.STRING:
      offs = int(self._starts[item])
      n = self._reader._get(offs, np.uint64)
      return n if which == 0 else self._reader._get(offs + 8, np.uint8, n[0])
    dtype = self._reader.gguf_scalar_to_np[self._itype]
    return self._reader._get(self._first + item * np.dtype(dtype).itemsize, dtype)


class LeanReader(gguf.GGUFReader):
  """`gguf.GGUFReader(path, mode)` with array fields parsed into offset tables."""

  def _get(self, offset: int, dtype, count: int = 1, override_order=None) -> np.ndarray:
    plain = self.__dict__.get("_plain")
    if plain is None:  # a plain ndarray over the map: views of it carry no memmap attributes
      plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
    count = int(count)
    end = offset + np.dtype(dtype).itemsize * count
    arr = plain[offset:end].view(dtype=dtype)[:count]
    return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None
                                           else override_order))

  def _array(self, offs: int, head: list) -> tuple[int, Sequence, Sequence[int], list[VT]]:
    raw_itype = self._get(offs, np.uint32)
    alen = self._get(offs + 4, np.uint64)
    itype = VT(int(raw_itype[0]))
    start = offs + 12
    n = int(alen[0])
    head = head + [raw_itype, alen]
    size = len(self._plain)
    if itype == VT.STRING:
      if n > (size - start) // 8:
        raise ValueError("array field runs past the end of the file: cannot reshape")
      starts = np.empty(n, np.int64)
      u64 = np.dtype(np.uint64).newbyteorder(self.byte_order)
      o = start  # walk the lengths: each string is a u64 length, then its bytes
      for k in range(n):
        starts[k] = o
        o += 8 + int(self._plain[o:o + 8].view(u64)[0])
      end, parts = o, _ArrayParts(self, head, itype, n, starts=starts)
      data = range(len(head) + 1, len(head) + 2 * n, 2)
    elif itype in self.gguf_scalar_to_np:
      end = start + np.dtype(self.gguf_scalar_to_np[itype]).itemsize * n
      parts, data = _ArrayParts(self, head, itype, n, first=start), range(len(head), len(head) + n)
    else:
      raise ValueError(f"Unknown/unhandled array item type {itype}")
    if end > size:
      raise ValueError("array field runs past the end of the file: cannot reshape")
    return end - offs, parts, data, [VT.ARRAY, itype]

  def _build_fields(self, offs: int, count: int) -> int:
    for _ in range(count):
      orig = offs
      klen, kdata = self._get_str(offs)
      offs += int(klen.nbytes + kdata.nbytes)
      raw_type = self._get(offs, np.uint32)
      offs += int(raw_type.nbytes)
      head = [klen, kdata, raw_type]
      name = str(bytes(kdata), encoding="utf-8")
      if VT(int(raw_type[0])) == VT.ARRAY:
        size, parts, data, types = self._array(offs, head)
      else:
        size, fparts, idxs, types = self._get_field_parts(offs, raw_type[0])
        parts, data = head + fparts, [i + len(head) for i in idxs]
      self._push_field(ReaderField(orig, name, parts, data, types), skip_sum=True)
      offs += size
    return offs
