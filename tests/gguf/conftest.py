"""Helpers for the gguf tests: rewrite a GGUF with one thing changed (a dropped tensor, other
dims or type, other metadata), to produce malformed inputs."""

import os
import subprocess
import sys

import gguf
import pytest

from ds4jax.gguf.split import _copy_field

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rewrite_gguf(src, out, *, drop=(), retype=None, meta=None, drop_meta=(), arch="deepseek4"):
  """Copies `src` to `out` with edits.

  drop: tensor names to leave out. retype: {name: (np array, GGMLQuantizationType or None)}
  replaces a tensor's data (GGUF dims follow the array). meta: {key: (value, GGUFValueType
  [, sub_type])} sets keys with explicit types. drop_meta: keys to leave out.
  """
  r = gguf.GGUFReader(src)
  w = gguf.GGUFWriter(str(out), arch)
  meta = dict(meta or {})
  for key, field in r.fields.items():
    if key.startswith("GGUF.") or key == "general.architecture" or key in drop_meta or key in meta:
      continue
    _copy_field(w, field)
  for key, spec in meta.items():
    value, vtype, *sub = spec
    w.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
  retype = retype or {}
  for t in r.tensors:
    if t.name in drop:
      continue
    if t.name in retype:
      data, qtype = retype[t.name]
      w.add_tensor(t.name, data, raw_dtype=qtype)
    else:
      w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(out)


def _run_script(name, *args, timeout=60):
  """Runs scripts/<name> in a subprocess; returns (returncode, stdout, stderr)."""
  p = subprocess.run([sys.executable, os.path.join(REPO, "scripts", name), *args],
                     capture_output=True, text=True, timeout=timeout, cwd=REPO)
  return p.returncode, p.stdout, p.stderr


@pytest.fixture
def rewrite():
  """`rewrite(src, out, drop=..., retype=..., meta=..., drop_meta=..., arch=...)`."""
  return rewrite_gguf


@pytest.fixture
def run_script():
  """`run_script(name, *args) -> (returncode, stdout, stderr)`."""
  return _run_script
