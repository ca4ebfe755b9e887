"""LeanReader: the same fields as gguf-py's reader, without a view per array element."""

import tracemalloc

import gguf
import numpy as np
import pytest

from ds4jax.gguf.lean import LeanReader
from ds4jax.gguf.reader import open_gguf
from ds4jax.gguf.errors import TruncatedError

N = 20000


@pytest.fixture(scope="module")
def big_arrays(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("lean") / "arrays.gguf")
  w = gguf.GGUFWriter(path, "deepseek4")
  w.add_array("t.strings", [f"tok{i}\u00e9" * (i % 3) for i in range(N)])
  w.add_array("t.ints", list(range(-5, N - 5)))
  w.add_array("t.floats", [0.5 * i for i in range(7)])
  w.add_array("t.empty", [])
  w.add_string("t.name", "lean")
  w.add_uint32("t.u32", 7)
  w.add_tensor("x", np.arange(12, dtype=np.float32).reshape(3, 4))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _same(a, b):
  assert list(a.fields) == list(b.fields)
  for k, fa in a.fields.items():
    fb = b.fields[k]
    assert (fa.offset, fa.name, fa.types) == (fb.offset, fb.name, fb.types), k
    assert fa.contents() == fb.contents(), k
    assert list(fa.data) == list(fb.data), k
    assert len(fa.parts) == len(fb.parts), k
    for i in [0, 1, 2, 3, 4, 5, 6, len(fa.parts) - 1]:
      if i < len(fa.parts):
        assert bytes(fa.parts[i]) == bytes(fb.parts[i]), (k, i)
        assert fa.parts[i].dtype == fb.parts[i].dtype, (k, i)
    if len(fa.data) > 3:
      assert fa.contents(3) == fb.contents(3)
  ta = [(t.name, t.tensor_type, t.data_offset, bytes(t.data)) for t in a.tensors]
  assert ta == [(t.name, t.tensor_type, t.data_offset, bytes(t.data)) for t in b.tensors]


def test_lean_fields_equal_gguf_py(big_arrays, tiny_gguf):
  for path in (big_arrays, tiny_gguf):
    _same(gguf.GGUFReader(path, "r"), LeanReader(path, "r"))


def test_lean_reader_allocates_no_view_per_element(big_arrays):
  def traced(cls):
    tracemalloc.start()
    r = cls(big_arrays, "r")
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del r
    return size
  full, lean = traced(gguf.GGUFReader), traced(LeanReader)
  # gguf-py: three views per string and int element (hundreds of bytes each).
  assert full > 100 * N
  assert lean < full / 20, (lean, full)


def test_truncated_array_is_a_one_line_error(big_arrays, tmp_path):
  data = open(big_arrays, "rb").read()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(data[:len(data) // 4])  # ends inside the string array
  with pytest.raises(TruncatedError, match="truncated GGUF file"):
    open_gguf(str(cut))
