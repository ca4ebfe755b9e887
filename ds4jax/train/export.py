"""A trained Stage as ds4-layout GGUFs, and the measurements of a run.

Variants (`EXPERTS`), all with ds4's types for everything but the routed experts (Q8_0
projections, shared experts and head; F16 embedding, HC fn, compressor, indexer, router;
F32 norms, sinks, biases; I32 tid2eid):

- `q8`: Q8_0 routed experts (the committed `docs` model);
- `q2`: ds4's 2-bit recipe, IQ2_XXS gate/up and Q2_K down experts (`gguf.quantize`);
- `f32`: every float tensor F32, the trained weights exactly.

`heldout_loss(path, inputs, targets)` runs a GGUF through the inference path (`load_model`,
one-shot prefill from position 0), so it measures the file that the demo serves.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Mapping

import numpy as np
from flax import nnx
from gguf import GGMLQuantizationType as Q

from ds4jax.config import LayerRange
from ds4jax.gguf import names
from ds4jax.gguf.quantize import quantize
from ds4jax.gguf.writer import RawTensor, write_gguf
from ds4jax.model.stage import Stage

EXPERTS = ("q8", "q2", "f32")
# ds4's q2 recipe: gate/up, down.
Q2_TYPES = (Q.IQ2_XXS, Q.Q2_K)


def stage_tensors(stage: Stage) -> dict[str, np.ndarray]:
  """{gguf_name: numpy array} of a whole-model stage (numpy orientation, float32 / int32)."""
  cfg = stage.cfg
  flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(stage, nnx.Param))}
  out = {}
  for name in names.ds4_tensor_names(cfg, LayerRange.full(cfg.n_layers)):
    out[name] = np.asarray(flat[names.param_path(name)][...])
  return out


def q2_fits(cfg) -> bool:
  """Whether the routed experts' rows (d_model for gate/up, expert_ff for down) fit the
  256-value blocks of IQ2_XXS / Q2_K."""
  return cfg.d_model % 256 == 0 and cfg.expert_ff % 256 == 0


def expert_tensors(tensors: Mapping[str, np.ndarray], experts: str) -> dict[str, object]:
  """`tensors` with the routed experts replaced by RawTensors of the `experts` recipe
  ('q2'); float otherwise (the writer's policy stores them)."""
  if experts != "q2":
    return dict(tensors)
  out: dict[str, object] = {}
  for name, arr in tensors.items():
    spec, _ = names.lookup(name)
    if spec.is_expert:
      qtype = Q2_TYPES[1] if spec.path[-1] == "down_exps" else Q2_TYPES[0]
      out[name] = RawTensor(quantize(arr, qtype), qtype)
    else:
      out[name] = arr
  return out


def write_model(path: str, stage_or_tensors, cfg, vocab, *, experts: str = "q8",
                metadata: Mapping[str, object] | None = None) -> str:
  """Writes a GGUF of the `experts` variant (see the module docstring); returns its path."""
  if experts not in EXPERTS:
    raise ValueError(f"unknown expert variant {experts!r}: expected one of {', '.join(EXPERTS)}")
  tensors = (stage_tensors(stage_or_tensors) if isinstance(stage_or_tensors, Stage)
             else dict(stage_or_tensors))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  write_gguf(tmp, cfg, expert_tensors(tensors, experts),
             types="f32" if experts == "f32" else "ds4", tokenizer=vocab.gguf_metadata(),
             name="ds4jax-docs", extra_metadata=dict(metadata or {}, **{
                 "ds4jax.experts": experts}))
  os.replace(tmp, path)
  return path


def heldout_loss(path: str, inputs: np.ndarray, targets: np.ndarray) -> float:
  """Mean next-token loss (nats/token) of a GGUF on windows [n, T], through inference."""
  from ds4jax.build import load_model  # deferred: the model stack is heavy
  model = load_model(path, ctx_size=inputs.shape[1], max_chunk=inputs.shape[1])
  total, count = 0.0, 0
  for inp, tgt in zip(inputs, targets):
    logits_TV = model.logits(inp).astype(np.float64)
    m = logits_TV.max(-1, keepdims=True)
    logz_T = np.log(np.exp(logits_TV - m).sum(-1)) + m[:, 0]
    total += float((logz_T - logits_TV[np.arange(len(tgt)), tgt]).sum())
    count += len(tgt)
  return total / count


def export_run(trainer, out: str, report: str, *, command: str, wall_s: float,
               say: Callable[[str], None] = print) -> dict:
  """Writes the q8 GGUF to `out`, the f32 and q2 variants to the workdir, measures each on
  the held-out windows through inference, and writes the run report (JSON) to `report`.
  `wall_s` is the wall time of the training command before the export."""
  t_export = time.perf_counter()
  cfg, vocab = trainer.cfg, trainer.corpus.vocab
  tensors = stage_tensors(trainer.stage())
  meta = {"ds4jax.chat": False,  # trained on plain text: generation defaults to --nochat
          "ds4jax.train.command": command,
          "ds4jax.train.steps": int(trainer.state.step),
          "ds4jax.train.held_out": ",".join(trainer.config.held_out)}
  paths = {"q8": out}
  for v in EXPERTS[1:]:
    paths[v] = os.path.join(trainer.workdir, f"docs-{v}.gguf")
  study = {}
  variants = EXPERTS if q2_fits(cfg) else ("q8", "f32")
  if "q2" not in variants:
    say(f"no q2 variant: d_model={cfg.d_model} and expert_ff={cfg.expert_ff} must be "
        "multiples of 256")
  for v in variants:
    t0 = time.perf_counter()
    write_model(paths[v], tensors, cfg, vocab, experts=v, metadata=meta)
    loss = heldout_loss(paths[v], trainer.eval_inputs, trainer.eval_targets)
    study[v] = {"heldout_loss": loss, "heldout_ppl": float(np.exp(loss)),
                "bytes": os.path.getsize(paths[v]), "file": os.path.basename(paths[v])}
    say(f"{v:>3} experts: held-out loss {loss:.4f} (ppl {np.exp(loss):.2f}), "
        f"{os.path.getsize(paths[v]) / 2**20:.2f} MiB, {paths[v]} "
        f"({time.perf_counter() - t0:.1f}s)")
  tr_inp, tr_tgt = trainer.train_probe()
  train_loss = heldout_loss(paths["f32"], tr_inp, tr_tgt)
  unigram = trainer.corpus.unigram_nll(trainer.config.seq_len)
  timed = [h["tok_s"] for h in trainer.history if h.get("tok_s")]
  rep = {
      "command": command, "train_wall_s": wall_s,
      "export_wall_s": time.perf_counter() - t_export, "steps": int(trainer.state.step),
      "tokens_per_step": trainer.config.batch_size * trainer.config.seq_len,
      "train_tok_s": timed[-1] if timed else None,
      "train_tokens": int(len(trainer.corpus.train)), "eval_tokens": int(trainer.eval_targets.size),
      "held_out": list(trainer.config.held_out),
      "final_train_loss": train_loss, "final_heldout_loss": study["f32"]["heldout_loss"],
      "unigram_heldout_loss": unigram, "unigram_heldout_ppl": float(np.exp(unigram)),
      "study": study, "history": trainer.history,
      "config": json.loads(trainer.config.to_json_best_effort()),
  }
  with open(report, "w") as f:
    json.dump(rep, f, indent=1)
  say(f"train loss {train_loss:.4f}, held-out loss {study['f32']['heldout_loss']:.4f} "
      f"(ppl {study['f32']['heldout_ppl']:.2f}; unigram {np.exp(unigram):.1f}); report {report}")
  return rep
