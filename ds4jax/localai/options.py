"""`LoadModel` options: LocalAI's `ModelOptions` -> a checked `LoadSpec` (docs/localai.md).

`Options` entries are "key:value", split at the first colon (a bare key means true; unknown
keys are ignored), as LocalAI's ds4 backend reads them. The ds4 keys keep the semantics and
the error texts of LocalAI PR #10098:

    ds4_role:coordinator        split mode; any other value, or none, is one process
    ds4_layers:START:END        the coordinator's own slice, inclusive (START:output too)
    ds4_listen:HOST:PORT        where workers dial in
    ds4_route_timeout:SECONDS   how long a Predict waits for the route (default 60)

ds4's expert streaming keys (`ssd_streaming`, `ssd_streaming_cache_experts:32GB|N`,
`ssd_streaming_preload_experts:N`, `ssd_streaming_cold`) become serve.py's `--ssd_streaming*`
flags. ds4's `kv_cache_dir:DIR` (relative: to the models directory) is the model process's
`--kv_disk_dir` (ds4's disk KV cache). ds4jax adds `ds4_key_file`, `ds4_tls_cert`,
`ds4_tls_key`, `ds4_activation_dtype`, `ds4_prefill_chunk` (ds4's `prefill_chunk` too) and
`ds4_max_concurrency`. Every problem is a
`LoadError` with one line, which the server returns as `Result(success=false)`.

Nothing here imports JAX: it runs in the gRPC process, before the model process starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

from ds4jax.config import expert_cache_option

log = logging.getLogger("ds4jax.localai")

# ds4's defaults: ContextSize 0 -> 32768 tokens, Tokens 0 -> 256 new tokens, 60 s route wait.
DEFAULT_CTX = 32768
DEFAULT_MAX_TOKENS = 256
DEFAULT_ROUTE_TIMEOUT_S = 60
DEFAULT_MAX_CONCURRENCY = 8
WIRE_DTYPES = {"f32": "f32", "bf16": "bf16", "int8": "int8", "32": "f32", "16": "bf16",
               "8": "int8"}
# ds4 engine knobs with no ds4jax equivalent: accepted (a LocalAI YAML written for ds4 loads)
# and logged as ignored.
DS4_ENGINE_KEYS = ("mtp_path", "mtp_draft", "mtp_margin", "power_percent", "warm_weights",
                   "quality", "simulate_used_memory", "expert_profile_path", "ds4_devices")

_LAYERS_RE = re.compile(r"(\d+):(\d+|output)")


class LoadError(ValueError):
  """A LoadModel request that cannot be served; the message is one line."""


@dataclasses.dataclass(frozen=True)
class LoadSpec:
  """What one LoadModel asks for, checked."""

  identity: str  # ModelOptions.Model: what PredictOptions.ModelIdentity must match
  path: str  # the GGUF (or ds4jax checkpoint directory)
  ctx_size: int
  coordinator: bool
  layers: str  # "all" for one process, else the coordinator's "0:K" / "0:output"
  listen: tuple[str, int] | None
  route_timeout: float
  activation_dtype: str = "f32"
  key_file: str | None = None
  tls_cert: str | None = None
  tls_key: str | None = None
  prefill_chunk: int = 256
  max_concurrency: int = DEFAULT_MAX_CONCURRENCY
  ignored: tuple[str, ...] = ()
  # ds4's directional steering: the file (absolute) and the FFN / attention scales.
  steering: tuple[str, float | None, float | None] | None = None
  # ds4's expert streaming: (cache experts, preload experts, cold), or None (resident).
  streaming: tuple[str, int, bool] | None = None
  kv_cache_dir: str | None = None  # ds4's disk KV cache (absolute)

  def model_args(self, cache_dir: str | None = None) -> list[str]:
    """The command line of the model process (`ds4jax.serving.model_proc`, serve.py's flags)."""
    args = [f"--gguf={self.path}", f"--ctx_size={self.ctx_size}",
            f"--route_timeout={self.route_timeout}", f"--prefill_chunk={self.prefill_chunk}",
            f"--layers={self.layers}", f"--max_sessions={max(self.max_concurrency, 8)}"]
    if self.coordinator:
      args += [f"--listen={self.listen[0]}:{self.listen[1]}",
               f"--activation_dtype={self.activation_dtype}"]
      if self.key_file:
        args.append(f"--key_file={self.key_file}")
      if self.tls_cert:
        args.append(f"--tls_cert={self.tls_cert}")
      if self.tls_key:
        args.append(f"--tls_key={self.tls_key}")
    if self.steering is not None:
      path, ffn, attn = self.steering
      args.append(f"--dir_steering_file={path}")
      args += [f"--dir_steering_{k}={v}" for k, v in (("ffn", ffn), ("attn", attn))
               if v is not None]
    if self.streaming is not None:
      cache, preload, cold = self.streaming
      args += ["--ssd_streaming", f"--ssd_streaming_cache_experts={cache}",
               f"--ssd_streaming_preload_experts={preload}"]
      if cold:
        args.append("--ssd_streaming_cold")
    if self.kv_cache_dir:
      args.append(f"--kv_disk_dir={self.kv_cache_dir}")
    if cache_dir:
      args.append(f"--cache_dir={cache_dir}")
    return args


def parse_options(entries: Sequence[str]) -> dict[str, Any]:
  """"key:value" entries split at the first colon; a bare key is True; blanks are skipped."""
  out: dict[str, Any] = {}
  for entry in entries:
    key, sep, value = str(entry).partition(":")
    key = key.strip()
    if key:
      out[key] = value.strip() if sep else True
  return out


def _positive_int(opts: dict[str, Any], key: str, message: str, default: int) -> int:
  if key not in opts:
    return default
  v = opts[key]
  if not isinstance(v, str) or not re.fullmatch(r"\d+", v) or int(v) <= 0:
    raise LoadError(message)
  return int(v)


def _path_option(opts: dict[str, Any], key: str, model_dir: str) -> str | None:
  v = opts.get(key)
  if v is None:
    return None
  if not isinstance(v, str) or not v:
    raise LoadError(f"ds4jax: {key} needs a path ({key}:PATH)")
  path = v if os.path.isabs(v) else os.path.join(model_dir, v)
  if not os.path.isfile(path):
    raise LoadError(f"ds4jax: {key} file not found: {path}")
  return path


def _dir_option(opts: dict[str, Any], key: str, model_dir: str) -> str | None:
  """A directory the model process creates if missing (`--kv_disk_dir` checks the rest)."""
  v = opts.get(key)
  if v is None:
    return None
  if not isinstance(v, str) or not v:
    raise LoadError(f"ds4jax: {key} needs a directory ({key}:DIR)")
  path = os.path.abspath(os.path.join(model_dir, v))
  if os.path.exists(path) and not os.path.isdir(path):
    raise LoadError(f"ds4jax: {key} {path} is a file, not a directory")
  return path


def _float_option(opts: dict[str, Any], key: str) -> float | None:
  v = opts.get(key)
  if v is None:
    return None
  try:
    f = float(v)
  except (TypeError, ValueError):
    f = float("nan")
  if f != f or f in (float("inf"), float("-inf")):
    raise LoadError(f"ds4: {key} must be a number, got {v!r}")
  return f


def model_path(model: str, model_file: str, model_dir: str) -> str:
  """ModelFile, else Model; a relative path is looked up in the models directory first."""
  path = model_file or model
  if not path:
    raise LoadError("ds4: ModelOptions.Model or .ModelFile must be set")
  if not os.path.isabs(path) and model_dir and os.path.exists(os.path.join(model_dir, path)):
    path = os.path.join(model_dir, path)
  return path


def load_spec(req) -> LoadSpec:
  """Checks a `ModelOptions` message (anything with its field names) and the model file.

  Checks everything that needs no GGUF parsing (the option values, that the file exists, that
  the listen port is free); `fit_to_model` adds the checks against the model. Raises LoadError
  with a one-line message on any problem.
  """
  model_dir = req.ModelPath or ""
  path = model_path(req.Model, req.ModelFile, model_dir)
  opts = parse_options(req.Options)
  base_dir = model_dir or os.path.dirname(os.path.abspath(path))

  coordinator = opts.get("ds4_role") == "coordinator"
  if "ds4_role" in opts and not coordinator:
    log.warning("ds4_role:%s is not coordinator: loading the whole model in one process",
                opts["ds4_role"])
  layers, listen = "all", None
  if coordinator:
    if "ds4_layers" not in opts or "ds4_listen" not in opts:
      raise LoadError("ds4: ds4_role:coordinator requires ds4_layers and ds4_listen")
    spec = opts["ds4_layers"]
    if not isinstance(spec, str) or not _LAYERS_RE.fullmatch(spec):
      raise LoadError(f"ds4: invalid ds4_layers (want START:END or START:output), got "
                      f"{spec if isinstance(spec, str) else '(no value)'!r}")
    if spec.split(":")[1] != "output" and int(spec.split(":")[1]) < int(spec.split(":")[0]):
      raise LoadError(f"ds4: invalid ds4_layers (want START:END or START:output), got {spec!r}: "
                      "END is before START")
    if int(spec.split(":")[0]) != 0:
      raise LoadError(f"ds4: coordinator layer range must start at layer 0, got {spec!r}")
    layers = spec
    listen = parse_listen(opts["ds4_listen"])
  route_timeout = _positive_int(opts, "ds4_route_timeout",
                                "ds4: ds4_route_timeout must be a positive integer",
                                DEFAULT_ROUTE_TIMEOUT_S)
  chunk_key = "ds4_prefill_chunk" if "ds4_prefill_chunk" in opts else "prefill_chunk"
  prefill_chunk = _positive_int(opts, chunk_key, f"ds4jax: {chunk_key} must be a positive "
                                "integer", 256)
  max_concurrency = _positive_int(opts, "ds4_max_concurrency", "ds4jax: ds4_max_concurrency "
                                  "must be a positive integer", DEFAULT_MAX_CONCURRENCY)
  dtype = WIRE_DTYPES.get(str(opts.get("ds4_activation_dtype", "f32")))
  if dtype is None:
    raise LoadError("ds4jax: ds4_activation_dtype must be f32, bf16 or int8")
  key_file = _path_option(opts, "ds4_key_file", base_dir)
  tls_cert = _path_option(opts, "ds4_tls_cert", base_dir)
  tls_key = _path_option(opts, "ds4_tls_key", base_dir)
  if tls_key and not tls_cert:
    raise LoadError("ds4jax: ds4_tls_key needs ds4_tls_cert")
  if coordinator:
    _check_security(key_file, tls_cert, tls_key)
  steering = None
  steer_file = _path_option(opts, "directional_steering_file", base_dir)
  if steer_file:
    steering = (steer_file, _float_option(opts, "directional_steering_ffn"),
                _float_option(opts, "directional_steering_attn"))
  elif any(k in opts for k in ("directional_steering_ffn", "directional_steering_attn")):
    raise LoadError("ds4: directional_steering_ffn/attn need directional_steering_file")
  streaming = _streaming(opts)
  kv_cache_dir = _dir_option(opts, "kv_cache_dir", base_dir)
  ignored = tuple(k for k in opts if k in DS4_ENGINE_KEYS)
  for k in ignored:
    log.warning("ignoring ds4 option %s: ds4jax has no equivalent", k)

  _check_path(path)
  ctx = int(req.ContextSize) if req.ContextSize > 0 else DEFAULT_CTX
  if coordinator:
    _check_port(*listen)
  return LoadSpec(identity=req.Model, path=os.path.abspath(path), ctx_size=ctx,
                  coordinator=coordinator,
                  layers=layers, listen=listen, route_timeout=float(route_timeout),
                  activation_dtype=dtype, key_file=key_file, tls_cert=tls_cert, tls_key=tls_key,
                  prefill_chunk=prefill_chunk, max_concurrency=max_concurrency, ignored=ignored,
                  steering=steering, streaming=streaming,
                  kv_cache_dir=kv_cache_dir)


def _streaming(opts: dict[str, Any]) -> tuple[str, int, bool] | None:
  """ds4's `ssd_streaming*` keys, checked: (cache, preload, cold) with `ssd_streaming` on,
  None without it (the other keys then do nothing, as in ds4, with a warning)."""
  keys = ("ssd_streaming_cache_experts", "ssd_streaming_preload_experts", "ssd_streaming_cold")
  on = opts.get("ssd_streaming", False)
  if on not in (True, "true", "1", "on", "yes", False, "false", "0", "off", "no"):
    raise LoadError(f"ds4: ssd_streaming takes no value or true/false, got {on!r}")
  if on not in (True, "true", "1", "on", "yes"):
    for k in keys:
      if k in opts:
        log.warning("ignoring %s: ssd_streaming is off", k)
    return None
  cache = opts.get("ssd_streaming_cache_experts", "32GB")
  try:
    expert_cache_option(cache if isinstance(cache, str) else "")
  except ValueError as e:
    raise LoadError(f"ds4: {str(e).lstrip('-')}") from None
  preload = _positive_int(opts, "ssd_streaming_preload_experts", "ds4: "
                          "ssd_streaming_preload_experts must be a positive integer", 0)
  cold = opts.get("ssd_streaming_cold", False) in (True, "true", "1", "on", "yes")
  return cache, preload, cold


def parse_listen(value: Any) -> tuple[str, int]:
  """ds4's ds4_listen: host:port split at the first colon (so no IPv6), port 1..65535."""
  if not isinstance(value, str):
    raise LoadError("ds4: ds4_listen must be host:port")
  host, sep, port = value.partition(":")
  if not sep or not host:
    raise LoadError(f"ds4: ds4_listen must be host:port, got {value!r}")
  if not re.fullmatch(r"\d+", port) or not 0 < int(port) < 65536:
    raise LoadError(f"ds4: ds4_listen port must be a positive integer, got {port!r}")
  return host, int(port)


def _check_path(path: str) -> None:
  """A GGUF file or a ds4jax checkpoint directory exists at path (its contents are checked by
  the tokenizer process, `fit_to_model`)."""
  if not os.path.exists(path):
    raise LoadError(f"ds4: model file not found: {path}")
  if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "ds4jax_checkpoint.json")):
    raise LoadError(f"ds4: {path} is a directory, not a GGUF file (set parameters.model in "
                    "the model YAML)")


def fit_to_model(spec: LoadSpec, *, n_layers: int, context_length: int) -> LoadSpec:
  """The spec checked against the model: the coordinator's range fits, the context is capped
  at the model's context length."""
  if spec.coordinator:
    from ds4jax.config import LayerRange, LayerRangeError
    try:
      LayerRange.parse(spec.layers, n_layers)
    except LayerRangeError as e:
      raise LoadError(f"ds4: {e}") from None
  if context_length and spec.ctx_size > context_length:
    log.info("ContextSize %d is more than the model's context length %d: using %d",
             spec.ctx_size, context_length, context_length)
    return dataclasses.replace(spec, ctx_size=context_length)
  return spec


def _check_security(key_file, tls_cert, tls_key) -> None:
  from ds4jax.wire import auth  # stdlib only
  try:
    auth.load_key(key_file)
    if tls_cert:
      auth.server_ssl_context(tls_cert, tls_key)
  except (ValueError, OSError) as e:
    raise LoadError(f"ds4jax: {(str(e).strip().splitlines() or [type(e).__name__])[0]}"
                    ) from None


def _check_port(host: str, port: int) -> None:
  from ds4jax import cli
  try:
    cli.check_port_free(host, port)
  except ValueError as e:
    raise LoadError(f"ds4: {e}") from None
