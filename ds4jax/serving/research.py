"""Per-request steering and capture for the OpenAI server (issue 22 item 6; docs/serving.md).

The server's ds4 steering flags (`--dir_steering_*`, `--expert_steering_*`) are every
request's default. A request's `steering` field overrides them option by option, with ds4's
option names: scales re-scale the server's files, and file names pick other files, but only
plain names inside the server's `--steering_dir` (a request never makes the server read a
path of its choosing). `"steering": null`, or scales of 0, turn steering off for that
request. Its `capture` field names points, layers and positions (generate.py's `--capture`
and `--capture_layers` spellings); the response carries exactly those arrays, bounded by
`--max_capture_mb` before any compute.

    research = Research(cfg, defaults={"dir_steering_file": "/srv/dir.f32"},
                        steering_dir="/srv/steer", max_capture_bytes=64 << 20)
    edits = research.edits({"dir_steering_ffn": 2.0})      # cached per (files, scales)
    spec = research.capture({"points": "ffn_out", "layers": "1:2"}, n_prompt=12,
                            max_new_tokens=16, ctx=128)
    body["capture"] = encode_captured(result.captured)     # decode_captured(...) -> Captured

Everything a request gets wrong is a one-line `BadRequest` (HTTP 400) before any compute.
"""

from __future__ import annotations

import base64
import collections
import os
import threading
from typing import Any, Mapping, Optional

import numpy as np

from ds4jax.runtime.capture import CaptureError, Captured, CaptureSpec
from ds4jax.runtime.edits import (DS4_STEERING_OPTIONS, EditError, Interventions,
                                  ds4_steering_options)

# The most captured bytes one response carries unless --max_capture_mb says otherwise.
DEFAULT_MAX_CAPTURE_BYTES = 64 << 20
# Resolved steering kept per (files, scales): a request does not re-read its files.
STEERING_CACHE_SIZE = 16
# Each file option and its scales; scales that are all 0 turn that file off.
_SIDES = (("dir_steering_file", ("dir_steering_ffn", "dir_steering_attn"), (1.0, 0.0)),
          ("expert_steering_file", ("expert_steering_scale",), (0.01,)))


class BadRequest(ValueError):
  """A request field this server or model cannot honour (HTTP 400 invalid_request)."""


def plain_name(name: Any) -> bool:
  """True for a file name with no directory part ("dir.f32"; not "a/b", "..", "")."""
  return (isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name
          and os.path.basename(name) == name
          and not (os.path.altsep and os.path.altsep in name) and "\\" not in name)


class Research:
  """The server's steering defaults and capture limit, resolving each request's fields.

  Args:
    cfg: the served model's `ModelConfig`; None refuses steering and capture (a backend
      without a model config, e.g. a test double).
    defaults: the server's ds4 steering options (`cli.steering_options()`; paths as given).
    steering_dir: the directory whose plain file names requests may use; None: none.
    max_capture_bytes: the most captured bytes one response may carry; 0 refuses captures.
  """

  def __init__(self, cfg, *, defaults: Optional[Mapping[str, Any]] = None,
               steering_dir: Optional[str] = None,
               max_capture_bytes: int = DEFAULT_MAX_CAPTURE_BYTES):
    self.cfg = cfg
    self.defaults = {k: v for k, v in (defaults or {}).items() if v is not None}
    if steering_dir is not None and not os.path.isdir(steering_dir):
      raise FileNotFoundError(f"--steering_dir is not a directory: {steering_dir}")
    self.steering_dir = steering_dir
    self.max_capture_bytes = int(max_capture_bytes)
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()
    if self.defaults:
      if cfg is None:
        raise ValueError("steering flags need a backend with a model config")
      ds4_steering_options(cfg, self.defaults)  # the flags' one-line errors, at start

  # ---- steering ---------------------------------------------------------------------------------

  def path(self, name: Any) -> str:
    """The path of a request's steering file name (a plain name in --steering_dir)."""
    if self.steering_dir is None:
      raise BadRequest("this server takes no steering file names from requests (start it "
                       "with --steering_dir)")
    if not plain_name(name):
      raise BadRequest(f"steering file names are plain names in the server's --steering_dir, "
                       f"got {name!r}")
    return os.path.join(self.steering_dir, name)

  def options(self, steering: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """The ds4 steering options of a request: the server's defaults, overridden by each
    option `steering` gives (None: the defaults; a file of None: that file off), with every
    scale of a file given (ds4's defaults). A side (directional, expert) whose scales are all
    0 is dropped."""
    opts = dict(self.defaults)
    given = dict(steering or {})
    for k, v in given.items():
      if k not in DS4_STEERING_OPTIONS:
        raise BadRequest(f"unknown steering option {k!r} (known: "
                         f"{', '.join(DS4_STEERING_OPTIONS)})")
      if k.endswith("_file"):
        opts[k] = None if v is None else self.path(v)
      elif v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool)
                                  and np.isfinite(v)):
        raise BadRequest(f"steering: {k} must be a finite number, got {v!r}")
      else:
        opts[k] = v
    for file, scales, dflt in _SIDES:
      vals = [float(dflt[i] if opts.get(s) is None else opts[s]) for i, s in enumerate(scales)]
      if not opts.get(file):
        bad = [s for s in scales if given.get(s)]
        if bad:
          raise BadRequest(f"steering: {bad[0]} needs {file} (neither the request nor the "
                           "server gives one)")
      if not opts.get(file) or not any(vals):
        for k in (file, *scales):
          opts.pop(k, None)
      else:  # every scale explicit: equal steering, equal options (the cache's key)
        opts.update(zip(scales, vals))
    return {k: v for k, v in opts.items() if v is not None}

  def edits(self, steering: Optional[Mapping[str, Any]]) -> Optional[Interventions]:
    """A request's resolved steering (`options`), cached per files and scales; None: off."""
    opts = self.options(steering)
    if not opts:
      return None
    if self.cfg is None:
      raise BadRequest("this backend takes no steering (no model config)")
    key = tuple(sorted((k, v, _stat(v) if k.endswith("_file") else None)
                       for k, v in opts.items()))
    with self._lock:
      hit = self._cache.get(key)
      if hit is not None:
        self._cache.move_to_end(key)
        return hit
    try:
      edits = ds4_steering_options(self.cfg, opts, prefix="")
    except (EditError, OSError) as e:  # without the server's directory in the message
      msg = str(e)
      if self.steering_dir is not None:
        msg = msg.replace(os.path.join(self.steering_dir, ""), "")
      raise BadRequest(msg) from None
    with self._lock:
      self._cache[key] = edits
      while len(self._cache) > STEERING_CACHE_SIZE:
        self._cache.popitem(last=False)
    return edits

  # ---- capture ----------------------------------------------------------------------------------

  def capture(self, capture: Optional[Mapping[str, Any]], n_prompt: int, max_new_tokens: int,
              ctx: int) -> Optional[CaptureSpec]:
    """A request's capture ({"points", "layers", "positions"}) checked against the model and
    against the byte limit for every position the generation may process: the prompt's
    `n_prompt`, then each of up to `max_new_tokens` (within `ctx`) fed back but the last."""
    if capture is None:
      return None
    if self.cfg is None:
      raise BadRequest("this backend cannot capture (no model config)")
    if self.max_capture_bytes <= 0:
      raise BadRequest("this server takes no captures (--max_capture_mb=0)")
    if not capture.get("points"):
      raise BadRequest('capture: name the points, e.g. {"points": "ffn_out,router_ids"}')
    try:
      spec = CaptureSpec.parse(capture["points"], capture.get("layers", "all"),
                               capture.get("positions", "all"),
                               self.max_capture_bytes).resolve(self.cfg)
    except (CaptureError, TypeError) as e:
      msg = str(e)
      raise BadRequest(msg if "capture" in msg else f"capture: {msg}") from None
    n_new = max(1, min(int(max_new_tokens), int(ctx) - int(n_prompt) + 1))
    end = int(n_prompt) + n_new - 1  # positions 0 .. end-1 run through the model
    if spec.positions == "all":
      rows = end
    elif spec.positions == "last":
      rows = n_new
    else:
      rows = sum(1 for p in spec.positions if p < end)
    need = rows * spec.row_bytes(self.cfg)
    if need > self.max_capture_bytes:
      raise BadRequest(f"capture of up to {rows} positions x {len(spec.names())} arrays needs "
                       f"{need} bytes, over this server's limit of {self.max_capture_bytes} "
                       "(--max_capture_mb): ask fewer points, layers, positions or tokens")
    return spec


def _stat(path: str):
  """(size, mtime) of a steering file, so a replaced file is read again; None if missing."""
  try:
    st = os.stat(path)
  except OSError:
    return None
  return (st.st_size, st.st_mtime_ns)


# ---- the response's encoding --------------------------------------------------------------------


def encode_captured(captured: Captured) -> dict[str, Any]:
  """The JSON form of a capture: {"positions": [int, ...] (R absolute positions, in the order
  the model processed them), "arrays": {key: {"shape": [R, ...], "dtype": "float32" |
  "int32", "data": base64 of the little-endian C-order bytes}}}."""
  arrays = {}
  for k, v in captured.arrays.items():
    a = np.asarray(v)
    dtype = "int32" if a.dtype.kind in "iu" else "float32"
    raw = np.ascontiguousarray(a, "<i4" if dtype == "int32" else "<f4").tobytes()
    arrays[k] = {"shape": list(a.shape), "dtype": dtype,
                 "data": base64.b64encode(raw).decode("ascii")}
  return {"positions": [int(p) for p in captured.positions], "arrays": arrays}


def decode_captured(d: Mapping[str, Any]) -> Captured:
  """`encode_captured`'s inverse (what a Python client runs on a response's `capture`)."""
  arrays = {}
  for k, a in d["arrays"].items():
    dt = {"int32": "<i4", "float32": "<f4"}[a["dtype"]]
    arrays[k] = np.frombuffer(base64.b64decode(a["data"]), dt).reshape(a["shape"])
  return Captured(np.asarray(d["positions"], np.int64), arrays)


__all__ = ["BadRequest", "DEFAULT_MAX_CAPTURE_BYTES", "Research", "decode_captured",
           "encode_captured", "plain_name"]
