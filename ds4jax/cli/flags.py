"""The scripts' shared flags, their config file, and the precedence of run options.

Scripts stay short (style rule 8): they define their own few flags, call `define_run_flags()`
for the shared ones and `cli.run(main)` instead of `app.run(main)`.

Precedence of run options (`option(name)`): an explicit `--flag` beats `--config.field`, which
beats the config file, which beats the flag's default.
"""

from __future__ import annotations

import collections.abc
import os
import sys
from typing import Any

from absl import flags
from ml_collections import config_flags

from ds4jax.config import devices_option as parse_devices  # the --devices flag's rules
from ds4jax.errors import one_line
from ds4jax.runtime.sampling import SamplingParams

FLAGS = flags.FLAGS


def define_run_flags(*, prompt: bool = True) -> None:
  """The flags every launch script shares (names are a contract, see issue 4 'Scripts')."""
  config_flags.DEFINE_config_file("config", None, "A configs/*.py file (get_config()).",
                                  lock_config=False)
  flags.DEFINE_string("gguf", None, "Path of the GGUF, 'docs' for the shipped trained model, "
                      "or 'tiny'/'bench' for a random test model.")
  flags.DEFINE_string("layers", "all", "The layers this process runs: 'all' or 0:K.")
  flags.DEFINE_string("listen", None, "HOST:PORT to listen on for workers (port 0: any).")
  flags.DEFINE_float("route_timeout", 60.0, "Seconds to wait for a complete route.")
  flags.DEFINE_integer("ctx_size", 4096, "KV capacity in tokens.")
  define_weight_flags()
  define_device_flags()
  define_steering_flags()
  flags.DEFINE_integer("prefill_chunk", 256, "Most tokens per prefill call (its power-of-two "
                       "buckets compile at load).", lower_bound=1)
  flags.DEFINE_integer("max_sessions", 8, "Sessions whose decode state this process keeps (the "
                       "pool slots of each stage); that many generations at once batch their "
                       "steps. Every decode batch size up to it compiles at load.",
                       lower_bound=1)
  flags.DEFINE_enum("activation_dtype", "f32", ["f32", "bf16", "int8"],
                    "Activation dtype on the wire (split runs).")
  define_kv_disk_flags()
  flags.DEFINE_string("key_file", None, "Pre-shared bridge key file (else $DS4JAX_KEY).")
  flags.DEFINE_string("tls_cert", None, "With --listen: serve the bridge over TLS with this "
                      "PEM certificate (workers verify it: scripts/worker.py --tls_ca).")
  flags.DEFINE_string("tls_key", None, "The PEM private key of --tls_cert (if not in it).")
  flags.DEFINE_string("cache_dir", None, "Where the tiny test models are built and cached.")
  flags.DEFINE_integer("max_new_tokens", 32, "Most tokens to generate.", lower_bound=1)
  flags.DEFINE_float("temperature", 0.0, "0 = greedy.", lower_bound=0.0)
  flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).", lower_bound=0)
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.", lower_bound=0)
  flags.DEFINE_boolean("thinking", False, "Chat format with <think> instead of </think>.")
  flags.DEFINE_string("system", None, "A system prompt for the chat format.")
  flags.DEFINE_boolean("warmup", False, "Run a 2-token generation first (not needed since "
                       "every shape compiles at load; kept for old command lines).")
  if prompt:
    flags.DEFINE_string("prompt", None, "Text prompt.")
    flags.DEFINE_list("prompt_tokens", None, "Exact prompt token ids, e.g. 0,17,42.")
    flags.DEFINE_boolean("chat", None, "Wrap --prompt in the ds4 chat format (default: what "
                         "the model was trained on: chat for ds4's GGUFs and the random test "
                         "models, plain text for the docs model; --chat / --nochat override).")
    flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")


def define_weight_flags() -> None:
  """--weights and --dtype, shared by every script that loads weights (issue 12)."""
  flags.DEFINE_enum("weights", "packed", ["packed", "dequantized"],
                    "packed: quantised tensors stay GGUF blocks in device memory and are "
                    "dequantised inside the step; dequantized: dequantise at load (the old path).")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                    "Compute dtype (default: float32 for a GGUF, the stored dtype for a "
                    "checkpoint directory).")
  define_streaming_flags()


def define_streaming_flags() -> None:
  """ds4's expert streaming (`--ssd-streaming*`, absl spelling; docs/design.md §15)."""
  flags.DEFINE_boolean("ssd_streaming", False, "Keep the routed experts in the GGUF (read on "
                       "demand into a bounded expert cache); every other weight is resident.")
  flags.DEFINE_string("ssd_streaming_cache_experts", "32GB", "With --ssd_streaming: the expert "
                      "cache's byte budget (e.g. 32GB, 512MiB) or a number N of expert slots "
                      "(an expert: one layer's gate, up and down of one expert id).")
  flags.DEFINE_integer("ssd_streaming_preload_experts", 0, "With --ssd_streaming: experts read "
                       "into the cache at start (layer by layer), at most what fits.",
                       lower_bound=0)
  flags.DEFINE_boolean("ssd_streaming_cold", False, "With --ssd_streaming: drop the GGUF's "
                       "pages from the OS page cache at start (misses read the disk).")


def streaming_options():
  """The run's `gguf.streaming.StreamingOptions` (None without --ssd_streaming); a bad cache
  size is a one-line error here, before any load."""
  if not option("ssd_streaming", False):
    return None
  from ds4jax.gguf.streaming import StreamingOptions  # deferred: --help imports no JAX
  return StreamingOptions.parse(option("ssd_streaming_cache_experts", "32GB"),
                                preload=int(option("ssd_streaming_preload_experts", 0)),
                                cold=bool(option("ssd_streaming_cold", False)))


def define_device_flags() -> None:
  """--devices, shared by every script that loads a stage (issue 14)."""
  flags.DEFINE_string("devices", "1", "Local devices this process's stage spans: 1 (one "
                      "device), N, or 'all'. The routed experts are sharded over them (expert "
                      "parallelism); N must divide the model's expert count.")


def define_kv_disk_flags() -> None:
  """ds4's disk KV cache (`--kv-disk-dir`, `--kv-disk-space-mb`, absl spelling)."""
  flags.DEFINE_string("kv_disk_dir", None, "ds4's disk KV cache: keep sessions' decode state "
                      "in this directory at prefill-chunk boundaries, keyed by the token "
                      "prefix, so a later prompt sharing the prefix (after a restart too) "
                      "loads it instead of computing it. Created if missing.")
  flags.DEFINE_integer("kv_disk_space_mb", None, "The disk KV cache's size limit in MB; the "
                       "least recently used entries are evicted (default 4096, as ds4).",
                       lower_bound=1)


def kv_disk_options() -> dict[str, str | int | None]:
  """{'kv_disk_dir', 'kv_disk_space_mb'} from the run options, checked (one-line errors)
  before any load: a size without a directory, a directory that is a file or unwritable."""
  directory, space = option("kv_disk_dir"), option("kv_disk_space_mb")
  if space is not None and not directory:
    raise ValueError("--kv_disk_space_mb needs --kv_disk_dir")
  if directory:
    from ds4jax.checkpoints.kv_disk import KVDiskError, check_dir
    try:
      directory = str(check_dir(directory))
    except KVDiskError as e:
      raise ValueError(f"--kv_disk_dir={option('kv_disk_dir')}: {e}") from None
  return {"kv_disk_dir": directory or None,
          "kv_disk_space_mb": None if space is None else int(space)}


def weight_options() -> dict[str, Any]:
  """{'weights': ..., 'dtype': ... or None (the source's), 'devices': N or 'all',
  'streaming': `streaming_options()`} from the run options."""
  dtype = option("dtype")
  return {"weights": str(option("weights", "packed")),
          "dtype": None if dtype is None else str(dtype),
          "devices": parse_devices(option("devices", 1)),
          "streaming": streaming_options()}


_config_path: str | None = None


def config() -> Any:
  """The loaded --config (None without one); a missing or broken file is a one-line error."""
  if "config" not in FLAGS:
    return None
  try:
    cfg = FLAGS["config"].value
  except Exception as e:  # config_flags defers some load errors to the first access
    if _config_path and not os.path.isfile(_config_path):
      raise FileNotFoundError(f"config file not found: {_config_path}") from None
    raise ValueError(f"cannot load config file {_config_path}: {e.__cause__ or e}") from None
  if type(cfg).__name__ == "_ErrorConfig":  # config_flags' placeholder for a failed load
    if _config_path and not os.path.isfile(_config_path):
      raise FileNotFoundError(f"config file not found: {_config_path}")
    raise ValueError(f"cannot load config file {_config_path}")
  if cfg is not None and not isinstance(cfg, collections.abc.Mapping) and not hasattr(
      type(cfg), "keys"):
    raise ValueError(f"config file {_config_path}: get_config() must return a ConfigDict, "
                     f"got {type(cfg).__name__}")
  return cfg


def option(name: str, default: Any = None) -> Any:
  """A run option: explicit flag > --config(.field) > flag default (or `default`)."""
  cfg = config()
  if name in FLAGS and FLAGS[name].present:
    return FLAGS[name].value
  if cfg is not None and name in cfg:
    return cfg[name]
  if name in FLAGS:
    return FLAGS[name].value
  return default


def worker_layers() -> str | None:
  """A worker's range: --layers, else the only entry of the config's `workers` (a route
  config with several workers needs --layers)."""
  if FLAGS["layers"].present or config() is None or not config().get("workers"):
    return FLAGS["layers"].value
  workers = list(config()["workers"])
  if len(workers) != 1:
    raise ValueError(f"the config lists {len(workers)} workers ({', '.join(workers)}): pick "
                     "this one's with --layers")
  return workers[0]


def define_steering_flags() -> None:
  """ds4's directional steering (`--dir-steering-*`, absl spelling)."""
  flags.DEFINE_string("dir_steering_file", None, "ds4 directional steering: a flat "
                      "little-endian float32 file of L x D unit directions, one per layer; "
                      "each is projected out of that layer's output (y -= s * d (d . y)).")
  flags.DEFINE_float("dir_steering_ffn", None, "The scale s on each layer's FFN output "
                     "(default 1 with a file; negative amplifies the direction).")
  flags.DEFINE_float("dir_steering_attn", None, "The scale s on each layer's attention output "
                     "(default 0: untouched).")
  flags.DEFINE_string("expert_steering_file", None, "ds4 expert steering: a flat little-endian "
                      "float32 file of L x E values (+1 promote, -1 suppress, 0 leave), "
                      "applied times the scale by ds4's margin rule (a promoted expert is "
                      "chosen on every token, a suppressed one on none).")
  flags.DEFINE_float("expert_steering_scale", None, "The expert map's scale (default 0.01 "
                     "with a file: the margin above the best expert).")


def define_capture_flags() -> None:
  """--capture, --capture_layers, --capture_out (generate.py, chat.py; `capture_spec`)."""
  flags.DEFINE_string(
      "capture", None, "Capture these points (comma list of attn_out, ffn_out, hc_out, "
      "router_ids, router_weights, router_scores, lens, logits) at every position the model "
      "processes (the prompt, then each generated token fed back), on whichever stage runs "
      "the layer.")
  flags.DEFINE_string("capture_layers", "all",
                      "Layers to capture: all, A:B (inclusive) or i,j,...")
  flags.DEFINE_string("capture_out", None, "Write the captured arrays to this .npz: keys "
                      "{point}.{layer} (e.g. ffn_out.3), logits, positions.")


def capture_spec():
  """The run's capture (`runtime.capture.CaptureSpec`) from the capture flags, or None; a bad
  point or layer list is a one-line error here, before any load."""
  from ds4jax.runtime.capture import CaptureSpec  # deferred: --help imports no numpy
  if bool(option("capture")) != bool(option("capture_out")):
    raise ValueError("--capture and --capture_out go together")
  if not option("capture"):
    return None
  return CaptureSpec.parse(option("capture"), option("capture_layers") or "all")


def steering_options() -> dict:
  """The ds4 steering flags that were given ({name: value}, `edits.DS4_STEERING_OPTIONS`)."""
  from ds4jax.runtime.edits import DS4_STEERING_OPTIONS  # deferred: --help imports no numpy
  return {k: option(k) for k in DS4_STEERING_OPTIONS if option(k) is not None}


def steering():
  """The run's ds4 steering (`runtime.edits.Interventions`): directional (--dir_steering_*)
  and expert (--expert_steering_*), checked against --gguf's header (before any load), or
  None."""
  from ds4jax.runtime import sources  # deferred: --help imports no JAX
  from ds4jax.runtime.edits import ds4_steering_options
  opts = steering_options()
  if not opts:
    return None
  from ds4jax.cli.paths import resolve_gguf  # its one-line error for a missing --gguf
  cfg = sources.model_info(resolve_gguf(option("gguf"), option("cache_dir")))[0]
  return ds4_steering_options(cfg, opts)


def chat_mode(tokenizer) -> bool:
  """--chat, else the model's own default (`Tokenizer.chat_model`, from its metadata)."""
  chat = option("chat")
  return bool(tokenizer.chat_model if chat is None else chat)


def sampling_params() -> SamplingParams:
  return SamplingParams(temperature=float(option("temperature", 0.0)),
                        top_k=int(option("top_k", 0)), top_p=float(option("top_p", 1.0)),
                        seed=int(option("seed", 0)))


def parse_tokens(values) -> list[int] | None:
  if values is None:
    return None
  if isinstance(values, str):
    values = [v for v in values.split(",") if v.strip()]
  try:
    return [int(v) for v in values]
  except ValueError:
    raise ValueError(f"--prompt_tokens must be comma-separated integers, got {values!r}") from None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, but a bad flag is one line on stderr (exit 2), not a usage dump."""
  global _config_path
  for k, a in enumerate(argv[1:], 1):
    if a.startswith("--config="):
      _config_path = a.split("=", 1)[1]
    elif a == "--config" and k + 1 < len(argv):
      _config_path = argv[k + 1]
  try:
    return FLAGS(argv)
  except Exception as e:  # flags.Error, or whatever a broken config file raises on import
    unknown = _unknown_override(argv) if _config_path and os.path.isfile(_config_path) else None
    if _config_path and not os.path.isfile(_config_path):
      msg = f"config file not found: {_config_path}"
    elif unknown:
      msg = unknown
    elif isinstance(e, flags.Error) and "config" not in str(e).lower():
      msg = one_line(e)
    elif _config_path:
      msg = f"cannot load config file {_config_path}: {type(e).__name__}: {one_line(e)}"
    else:
      msg = one_line(e)
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _unknown_override(argv: list[str]) -> str | None:
  """'--config.X=...: the config file has no field X (its fields: ...)' for the first
  override naming a field the config lacks; None if every one exists (or it cannot tell)."""
  import runpy
  try:
    cfg = runpy.run_path(_config_path)["get_config"]()
  except Exception:  # a broken file: the caller says why
    return None
  for a in argv[1:]:
    if not a.startswith("--config."):
      continue
    node, names = cfg, a[len("--config."):].split("=", 1)[0].split(".")
    for k, name in enumerate(names):
      if not hasattr(node, "keys") or name not in node:
        where = ".".join(names[:k]) or _config_path
        fields = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
        return (f"--config.{'.'.join(names)}: {where} has no field {name!r} (its fields: "
                f"{fields})")
      node = node[name]
  return None
