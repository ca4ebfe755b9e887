"""Prints a ds4 GGUF's config, layer schedule, bytes per layer / slice, and a balanced split;
or, with --plan, what each of N hosts holds and whether it fits in --host_memory.

  python scripts/inspect_gguf.py --gguf=model.gguf --split=3
  python scripts/inspect_gguf.py --gguf=model.gguf --layers=0:20
  python scripts/inspect_gguf.py --gguf=model.gguf --plan=2 --host_memory=128 --ctx=8192
  python scripts/inspect_gguf.py --preset=flash --plan=2 --host_memory=128 --ctx=8192

--plan sizes each host of the byte-balanced contiguous split: its weights (from the file's
tensor table, or with --preset from metadata alone: the name table and GGML type sizes, so
no file is needed) plus the decode state a runner allocates for --ctx tokens (jax.eval_shape
of the state, --dtype entries, --sessions of them), plus an allowance for everything else
(--overhead_frac of weights + state, plus --overhead_gb). GB is 10^9 bytes. For reference,
the full 43-layer Flash in ds4's q2 mix (--preset=flash) is 86.7 GB = 80.8 GiB of weights,
the published "~81 GB" file (docs packed-quant.md section 5).
"""

from absl import flags

from ds4jax.config import ModelConfig
from ds4jax import cli
from ds4jax.gguf import table
from ds4jax.partition import summary

_GGUF = flags.DEFINE_string("gguf", None, "A ds4 GGUF (full or split).")
_SPLIT = flags.DEFINE_integer("split", 0, "Suggest a balanced split into N contiguous ranges.",
                              lower_bound=0)
_LAYERS = flags.DEFINE_string("layers", None,
                              "Also print the bytes of this slice (A:B, A:output, all).")
_PLAN = flags.DEFINE_integer("plan", 0, "Plan N hosts: weights + decode state per host of the "
                             "balanced split, and whether each fits in --host_memory.",
                             lower_bound=0)
_PRESET = flags.DEFINE_enum("preset", None, ["flash", "tiny", "bench"],
                            "With --plan and no --gguf: plan these dims from metadata alone "
                            "(flash: DeepSeek V4 Flash, 43 layers, 86.7 GB in the q2 mix).")
_N_LAYERS = flags.DEFINE_integer("n_layers", None, "With --preset: keep the first N layers.",
                                 lower_bound=1)
_EXPERTS = flags.DEFINE_enum("experts", "iq2", sorted(table.EXPERT_RECIPES),
                             "With --preset: routed expert types (iq2 = ds4's q2 mix: IQ2_XXS "
                             "gate/up, Q2_K down; q4: Q4_K).")
_HOST_MEMORY = flags.DEFINE_float("host_memory", None, "Memory per host in GB (10^9 bytes; a "
                                  "128 GiB machine is 137.4 GB).", lower_bound=0.0)
_CTX = flags.DEFINE_integer("ctx", 4096, "With --plan: decode state capacity in tokens.",
                            lower_bound=1)
flags.DEFINE_alias("ctx_size", "ctx")  # the run scripts' name for it
_CHUNK = flags.DEFINE_integer("prefill_chunk", 256, "With --plan: most tokens per prefill call "
                              "(the state keeps that much slack).", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "With --plan: decode state dtype (a runner's is its compute --dtype).")
_SESSIONS = flags.DEFINE_integer("sessions", 1, "With --plan: decode states per host (a worker "
                                 "keeps up to --max_sessions).", lower_bound=1)
_STREAM = flags.DEFINE_string("ssd_streaming_cache_experts", None, "With --plan: plan for "
                              "ds4's --ssd_streaming with this expert cache per host (32GB, or N "
                              "expert slots): the routed experts stay in the file, each host "
                              "holds its other weights and the cache.")
_OVERHEAD_GB = flags.DEFINE_float("overhead_gb", 1.5, "With --plan: fixed allowance per host, GB.",
                                  lower_bound=0.0)
_OVERHEAD_FRAC = flags.DEFINE_float("overhead_frac", 0.25, "With --plan: allowance per host, as "
                                    "a fraction of its weights + state.", lower_bound=0.0)


def _plan() -> str:
  from ds4jax.gguf import reader
  from ds4jax.partition import memory
  from ds4jax.partition.plan import plan_ranges

  if (_GGUF.value is None) == (_PRESET.value is None):
    raise ValueError("--plan needs exactly one of --gguf (a file's tensor table) or --preset "
                     "(metadata alone)")
  if _GGUF.value is not None:
    f = reader.open_gguf(_GGUF.value)
    if f.held is not None and not (f.held.start == 0 and f.held.has_output
                                   and f.held.end == f.cfg.n_layers - 1):
      raise ValueError(f"{f.path}: a split file holds only layers {f.held.describe()}: plan "
                       f"from the full file or from --preset")
    cfg = f.cfg
    sizes = f.layer_bytes
    source = f"{f.path} ({cfg.n_layers} layers, its tensor table)"
  else:
    overrides = {} if _N_LAYERS.value is None else {"n_layers": _N_LAYERS.value}
    cfg = getattr(ModelConfig, _PRESET.value)(**overrides)
    tensors = table.tensor_table(cfg, experts=_EXPERTS.value)
    sizes = lambda **kw: table.layer_bytes(tensors, cfg.n_layers, **kw)  # noqa: E731
    source = (f"--preset={_PRESET.value} ({cfg.n_layers} layers, {_EXPERTS.value} experts, "
              f"from metadata)")
  embed, per_layer, head = sizes()
  cache, streaming = 0, None
  if _STREAM.value is not None:  # the routed experts stay in the file; each host adds a cache
    resident = sizes(resident_only=True)[1]
    cache, streaming = _expert_cache(cfg, per_layer, resident)
    per_layer = resident
  state = memory.state_layer_bytes(cfg, ctx=_CTX.value, max_chunk=_CHUNK.value,
                                   dtype=_DTYPE.value)
  overhead = memory.Overhead(fixed=int(_OVERHEAD_GB.value * memory.GB) + cache,
                             frac=_OVERHEAD_FRAC.value)
  host = None if _HOST_MEMORY.value is None else int(_HOST_MEMORY.value * memory.GB)
  kw = {"state_bytes": state, "sessions": _SESSIONS.value, "overhead": overhead}
  rows = memory.plan_hosts(cfg, embed, per_layer, head, _PLAN.value, host_memory=host, **kw)
  weights = embed + sum(per_layer) + head
  lines = [
      f"plan: {source} over {_PLAN.value} host(s)",
      (f"  weights {weights / memory.GB:.2f} GB ({weights / 2**30:.2f} GiB): embedding "
       f"{embed / memory.GB:.2f}, layers {sum(per_layer) / memory.GB:.2f}, head "
       f"{head / memory.GB:.2f} GB"),
      (f"  decode state: ctx {_CTX.value}, prefill chunk {_CHUNK.value}, {_DTYPE.value}, "
       f"{_SESSIONS.value} session(s): {sum(state) * _SESSIONS.value / memory.GB:.3f} GB in all"),
      memory.format_plan(rows, host_memory=host, overhead=overhead),
  ]
  if streaming is not None:
    lines.insert(2, streaming)
  by_weights = plan_ranges(per_layer, _PLAN.value, embed_bytes=embed, head_bytes=head)
  if [r.layers for r in rows] != by_weights:
    lines.append(f"  (balanced on weights + state; on weights alone (--split) it would be "
                 f"{'  '.join(str(r) for r in by_weights)})")
  if host is not None:
    n = memory.fewest_hosts(cfg, embed, per_layer, head, host, **kw)
    verdict = "every host fits" if all(r.fits for r in rows) else "some host does NOT fit"
    fewest = (f"fewest hosts that fit: {n}" if n is not None else
              "no split fits (one layer per host is already too much)")
    lines.append(f"{verdict} in {_HOST_MEMORY.value:g} GB; {fewest}")
  return "\n".join(lines)


def _expert_cache(cfg, per_layer, resident) -> tuple[int, str]:
  """(the expert cache's bytes per host, a line saying what streaming keeps in the file) for
  --ssd_streaming_cache_experts (a byte budget, or N slots of the largest layer's expert)."""
  from ds4jax.config import expert_cache_option
  from ds4jax.partition import memory
  routed = [a - b for a, b in zip(per_layer, resident)]
  entry = max(routed) // cfg.n_experts  # one expert (gate, up, down) of the largest layer
  budget, slots = expert_cache_option(_STREAM.value)
  cache = budget if budget is not None else slots * entry
  if cache < cfg.n_experts_used * entry:
    raise ValueError(f"--ssd_streaming_cache_experts={_STREAM.value} is below one token's "
                     f"experts: at least {cfg.n_experts_used} slots "
                     f"({cfg.n_experts_used * entry} bytes)")
  return cache, (f"  --ssd_streaming: routed experts {sum(routed) / memory.GB:.2f} GB stay in "
                 f"the file; each host holds its other weights and a "
                 f"{cache / memory.GB:.2f} GB expert cache ({cache // entry} experts of "
                 f"{entry / 2**20:.1f} MiB), counted in its fixed allowance")


def main(argv):
  del argv
  if _PLAN.value:
    print(_plan())
    return
  if _GGUF.value is None:
    raise ValueError("--gguf is required (or --plan=N with --preset for a metadata-only plan)")
  print(summary.describe(_GGUF.value, split=_SPLIT.value, layers=_LAYERS.value))


if __name__ == "__main__":
  cli.run(main)
