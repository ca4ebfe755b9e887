"""checkpoints/manifest.py: the manifest checks and the overwrite rule that orbax checkpoints
and session snapshots share, each failure a one-line error of the caller's type."""

import json

import pytest

from ds4jax.checkpoints import manifest


class FormatError(ValueError):
  pass


FMT = dict(name="m.json", fmt="fmt-x", version=3, what="thing", error=FormatError)


def write(d, obj):
  d.mkdir(exist_ok=True)
  (d / "m.json").write_text(obj if isinstance(obj, str) else json.dumps(obj))
  return d


def test_reads_a_good_manifest(tmp_path):
  d = write(tmp_path / "ok", {"format": "fmt-x", "version": 3, "k": [1]})
  assert manifest.read_manifest(d, **FMT) == {"format": "fmt-x", "version": 3, "k": [1]}


@pytest.mark.parametrize("content, msg", [
    (None, "x: not a directory"),
    ("", "x: not a thing (m.json is missing)"),
    ('{"format": ', "x: corrupt manifest (JSONDecodeError"),
    ("[1]", "x: not a fmt-x manifest"),
    ({"format": "fmt-y", "version": 3}, "x: not a fmt-x manifest"),
    ({"format": "fmt-x", "version": 2}, "x: format version 2 is not supported (this code reads 3)"),
])
def test_refusals_name_the_directory(tmp_path, content, msg):
  d = tmp_path / "x"
  if content == "":
    d.mkdir()
  elif content is not None:
    write(d, content)
  with pytest.raises(FormatError) as e:
    manifest.read_manifest(d, **FMT, where="x")
  assert msg in str(e.value) and "\n" not in str(e.value)


def test_check_target(tmp_path):
  fmt = {k: FMT[k] for k in ("name", "what", "error")}
  new = tmp_path / "new"
  assert manifest.check_target(new, overwrite=False, **fmt) == new.absolute()
  old = write(tmp_path / "old", {})
  with pytest.raises(FormatError, match="already exists \\(say yes\\)"):
    manifest.check_target(old, overwrite=False, how="say yes", **fmt)
  assert manifest.check_target(old, overwrite=True, **fmt) == old.absolute()
  other = tmp_path / "other"
  other.mkdir()
  (tmp_path / "file").write_text("x")
  for p in (other, tmp_path / "file"):
    with pytest.raises(FormatError, match="is not a thing; refusing to replace it"):
      manifest.check_target(p, overwrite=True, **fmt)
