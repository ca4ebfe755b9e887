"""The JSON manifest that marks a ds4jax directory format (orbax stage checkpoints, session
snapshots): the checks every reader of one makes before looking at its own fields."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Collection


def read_manifest(directory, *, name: str, fmt: str, version: int | Collection[int], what: str,
                  error: type[Exception], where: str | None = None) -> dict[str, Any]:
  """The JSON object in `directory/name`, if its "format" is `fmt` and its "version" is
  `version` (or one of several, for a reader of older formats too).

  Anything else raises `error` with a one-line message starting with `where` (default: the
  directory); `what` names the format for a human ("session snapshot").
  """
  d = pathlib.Path(directory)
  where = where or str(d)
  if not d.is_dir():
    raise error(f"{where}: not a directory")
  mf = d / name
  if not mf.is_file():
    raise error(f"{where}: not a {what} ({name} is missing)")
  try:
    m = json.loads(mf.read_text())
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise error(f"{where}: corrupt manifest ({type(e).__name__}: {e})") from None
  if not isinstance(m, dict) or m.get("format") != fmt:
    raise error(f"{where}: not a {fmt} manifest")
  versions = (version,) if isinstance(version, int) else tuple(version)
  if m.get("version") not in versions:
    reads = ", ".join(str(v) for v in versions)
    raise error(f"{where}: format version {m.get('version')!r} is not supported (this code "
                f"reads {reads})")
  return m


def check_target(directory, *, name: str, what: str, error: type[Exception], overwrite: bool,
                 how: str = "pass overwrite") -> pathlib.Path:
  """The absolute path to write a `what` to, if it may be written: absent, or (with
  `overwrite`) a directory of this format, never anything else. `how` says how to allow an
  overwrite ("pass overwrite")."""
  out = pathlib.Path(directory).absolute()
  if out.exists():
    if not overwrite:
      raise error(f"{out} already exists ({how})")
    if not (out / name).is_file():
      raise error(f"{out} exists and is not a {what}; refusing to replace it")
  return out
