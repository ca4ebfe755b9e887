"""Writes a split GGUF: one slice's tensors (raw bytes, unchanged), the same metadata, plus
`ds4jax.fingerprint` (the full model's) and `ds4jax.layers` (the slice held)."""

from __future__ import annotations

import os

import gguf
from gguf import GGUFValueType as VT

from ds4jax.config import LayerRange
from ds4jax.gguf import names
from ds4jax.gguf.errors import GGUFError
from ds4jax.gguf.reader import FINGERPRINT_KEY, LAYERS_KEY, DS4File, open_gguf

# Keys GGUFWriter writes itself or that describe the file rather than the model.
_SKIP = {"general.architecture", "general.alignment", FINGERPRINT_KEY, LAYERS_KEY}


def _copy_field(w: gguf.GGUFWriter, field) -> None:
  types = list(field.types)
  if types[0] == VT.ARRAY:
    if len(types) != 2:
      raise GGUFError(f"metadata key {field.name!r}: nested arrays are not supported")
    w.add_key_value(field.name, field.contents(), VT.ARRAY, sub_type=types[1])
  else:
    w.add_key_value(field.name, field.contents(), types[0])


def split_gguf(src: str | os.PathLike | DS4File, layers: LayerRange | str,
               out: str | os.PathLike, *, output: bool | None = None) -> tuple[str, LayerRange]:
  """Writes the slice `layers` of `src` to `out`; returns (out, the resolved range)."""
  f = src if isinstance(src, DS4File) else open_gguf(src)
  rng = f.resolve(layers)
  if output is not None:
    rng = LayerRange(rng.start, rng.end, bool(output))
  f.validate(rng)
  if os.path.abspath(os.fspath(out)) == os.path.abspath(f.path):
    raise GGUFError(f"{out}: refusing to overwrite the input file")
  w = gguf.GGUFWriter(os.fspath(out), "deepseek4")
  w.data_alignment = int(f.reader.alignment)
  if "general.alignment" in f.reader.fields:
    w.add_custom_alignment(int(f.reader.alignment))
  for key, field in f.reader.fields.items():
    if key.startswith("GGUF.") or key in _SKIP:
      continue
    _copy_field(w, field)
  w.add_string(FINGERPRINT_KEY, f.fingerprint())
  w.add_string(LAYERS_KEY, str(rng))
  for t in f.reader.tensors:
    try:
      owned = names.owner(t.name, rng)
    except names.UnknownTensorError:
      owned = False  # not part of the ds4 layout: ds4 ignores it, so does the split
    if owned:
      # The memory-mapped view goes straight to the output; nothing is dequantised.
      w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return os.fspath(out), rng
