"""Next-token training of a whole-model `Stage`: optax AdamW, a jitted donated step, periodic
eval, orbax checkpoints that resume exactly, a progress line.

    trainer = Trainer(config, workdir="/tmp/run")   # resumes if workdir holds a checkpoint
    history = trainer.run()                          # [{step, loss, eval_loss, ...}]
    stage = trainer.stage()                          # the trained model, for export

The batch of step s is a pure function of (seed, s) (`data.Corpus.epoch_windows`) and the
step is a deterministic XLA program, so a run restored from the checkpoint at step s
computes the same losses and parameters, bit for bit, as one that never stopped.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from ds4jax.checkpoints.orbax_io import _quiet_orbax
from ds4jax.config import LayerRange, ModelConfig
from ds4jax.model.stage import Stage
from ds4jax.train import data as data_lib
from ds4jax.train import model as model_lib

log = logging.getLogger("ds4jax.train")


@struct.dataclass
class TrainState:
  """params: the trained parameters; bias: the router biases (balancing rule); fixed:
  tid2eid and the indexer (see `train.model`); opt_state: AdamW's; step: int32 []."""

  params: nnx.State
  bias: nnx.State
  fixed: nnx.State
  opt_state: Any
  step: jax.Array


def model_config(config) -> ModelConfig:
  """The ModelConfig of `config.model` (a ConfigDict of ModelConfig fields)."""
  kw = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.model.items()}
  return ModelConfig(**kw)


def schedule(config) -> optax.Schedule:
  """Linear warm-up to `lr`, then cosine decay to `lr * final_lr_frac` at `steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=config.warmup_steps,
      decay_steps=config.steps, end_value=config.lr * config.final_lr_frac)


def optimizer(config) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW; weight decay on matrices only (not on norms, HC
  bases and scales, sinks)."""
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(config.clip_norm),
      optax.adamw(schedule(config), b1=config.b1, b2=config.b2, eps=1e-8,
                  weight_decay=config.weight_decay, mask=decay_mask))


def init_stage(cfg: ModelConfig, seed: int) -> Stage:
  """A fresh whole-model Stage: the modules' own init (normal(0, 0.02) projections, a
  normal(0, 1) embedding, unit norms, zero HC bases, sinks and APE), except tid2eid, which
  gets k distinct experts per token (uniform at random)."""
  stage = Stage(cfg, LayerRange.full(cfg.n_layers), rngs=nnx.Rngs(seed))
  rng = np.random.default_rng([seed, 1])
  for il in range(cfg.n_hash_layers):
    eid_VK = np.argsort(rng.random((cfg.vocab_size, cfg.n_experts)), axis=1)
    stage.blocks[il].moe.tid2eid[...] = jnp.asarray(eid_VK[:, :cfg.n_experts_used], jnp.int32)
  return stage


@functools.lru_cache(maxsize=4)
def _programs(cfg: ModelConfig, hparams: tuple):
  """The jitted init, train and eval programs of a (model config, optimizer config) pair;
  cached so that a second Trainer in the same process (a resume) compiles nothing."""
  config = _Hparams(*hparams)
  tx = optimizer(config)
  graphdef = nnx.graphdef(init_stage_abstract(cfg))

  def loss_fn(params, bias, fixed, batch):
    stage = nnx.merge(graphdef, params, bias, fixed)
    return model_lib.batch_loss(stage, *batch, block=config.expert_block)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def train_step(ts: TrainState, batch):
    (loss, (_, _, loads)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        ts.params, ts.bias, ts.fixed, batch)
    updates, opt_state = tx.update(grads, ts.opt_state, ts.params)
    params = optax.apply_updates(ts.params, updates)
    bias = model_lib.balance_bias(ts.bias, loads, cfg, config.bias_rate)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return ts.replace(params=params, bias=bias, opt_state=opt_state, step=ts.step + 1), metrics

  @jax.jit
  def eval_step(ts: TrainState, batch):
    _, (total, count, _) = loss_fn(ts.params, ts.bias, ts.fixed, batch)
    return total, count

  def init(seed: int) -> TrainState:
    _, params, bias, fixed = nnx.split(init_stage(cfg, seed), *model_lib.param_filters())
    ts = TrainState(params, bias, fixed, tx.init(params), jnp.zeros((), jnp.int32))
    # Committed, like a restored state: jit keys its cache on it (a resume must not compile).
    return jax.device_put(ts, jax.devices()[0])

  return train_step, eval_step, init, graphdef


def init_stage_abstract(cfg: ModelConfig) -> Stage:
  return nnx.eval_shape(lambda: Stage(cfg, LayerRange.full(cfg.n_layers), rngs=nnx.Rngs(0)))


# The config fields the compiled programs depend on (hashable, for the program cache).
_HPARAM_FIELDS = ("lr", "warmup_steps", "steps", "final_lr_frac", "b1", "b2", "weight_decay",
                  "clip_norm", "bias_rate", "expert_block")
# Config fields a resumed run may change (they do not change what is computed).
_FREE_FIELDS = ("log_every", "eval_every", "checkpoint_every")
_Hparams = collections.namedtuple("_Hparams", _HPARAM_FIELDS)


def _hparams(config) -> tuple:
  return tuple(config[k] for k in _HPARAM_FIELDS)


class Trainer:
  """Trains `config` (see configs/train_docs.py) in `workdir` (checkpoints, config.json,
  history.json, vocab.json). A workdir with checkpoints is resumed from the latest one; it
  must have been made with the same config."""

  def __init__(self, config, workdir: str, *, say: Callable[[str], None] | None = None):
    import orbax.checkpoint as ocp  # deferred: orbax is slow to import

    self.config, self.workdir = config, os.path.abspath(workdir)
    self.say = say or (lambda m: log.info("%s", m))
    self.cfg = model_config(config)
    os.makedirs(self.workdir, exist_ok=True)
    self._check_config()
    vocab_path = os.path.join(self.workdir, "vocab.json")
    vocab = None
    if os.path.exists(vocab_path):
      with open(vocab_path) as f:
        vocab = data_lib.Vocab.from_json(f.read())
    self.corpus = data_lib.Corpus.build(self.cfg.vocab_size, tuple(config.held_out), vocab)
    if vocab is None:
      with open(vocab_path, "w") as f:
        f.write(self.corpus.vocab.to_json())
    self.eval_inputs, self.eval_targets = data_lib.windows(self.corpus.eval, config.seq_len)
    self._train_step, self._eval_step, init, self.graphdef = _programs(
        self.cfg, _hparams(config))
    with _quiet_orbax():
      self.manager = ocp.CheckpointManager(
          os.path.join(self.workdir, "checkpoints"),
          options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                               enable_async_checkpointing=False))
    self.state = init(config.seed)
    self.history: list[dict] = []
    latest = self.manager.latest_step()
    if latest is not None:
      self.restore(latest)
    self._epoch_cache: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None

  # --------------------------------------------------------------------------- checkpoints
  def _check_config(self) -> None:
    path = os.path.join(self.workdir, "config.json")
    mine = json.loads(self.config.to_json_best_effort(sort_keys=True))
    for k in _FREE_FIELDS:
      mine.pop(k, None)
    if os.path.exists(path):
      with open(path) as f:
        theirs = json.load(f)
      if theirs != mine:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise ValueError(f"{self.workdir} holds a run with another config (differs in "
                         f"{', '.join(diff)}): use another --workdir")
    else:
      with open(path, "w") as f:
        json.dump(mine, f, indent=1, sort_keys=True)

  def save(self) -> None:
    """Writes the checkpoint of the current step (and the history so far)."""
    import orbax.checkpoint as ocp
    step = int(self.state.step)
    with _quiet_orbax():
      self.manager.save(step, args=ocp.args.StandardSave(self.state), force=True)
      self.manager.wait_until_finished()
    with open(os.path.join(self.workdir, "history.json"), "w") as f:
      json.dump(self.history, f)

  def restore(self, step: int) -> None:
    import orbax.checkpoint as ocp
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.state)
    with _quiet_orbax():
      self.state = self.manager.restore(step, args=ocp.args.StandardRestore(target))
    hist = os.path.join(self.workdir, "history.json")
    if os.path.exists(hist):
      with open(hist) as f:
        self.history = [h for h in json.load(f) if h["step"] <= step]
    self.say(f"resumed from the checkpoint at step {step}")

  # ---------------------------------------------------------------------------------- data
  def batch(self, step: int):
    """(inputs, targets, weights) of step `step`: a pure function of (seed, step)."""
    c = self.config
    n_per_epoch = (len(self.corpus.train) - c.seq_len - 1) // c.seq_len // c.batch_size
    epoch, i = divmod(step, n_per_epoch)
    if self._epoch_cache is None or self._epoch_cache[0] != epoch:
      self._epoch_cache = (epoch, self.corpus.epoch_windows(c.seq_len, c.seed, epoch))
    inp, tgt = self._epoch_cache[1]
    sl = slice(i * c.batch_size, (i + 1) * c.batch_size)
    return inp[sl], tgt[sl], np.ones(tgt[sl].shape, np.float32)

  def train_probe(self):
    """As many training windows (offset 0, in order) as there are eval windows: the train
    loss measured the way the held-out loss is."""
    inp, tgt = data_lib.windows(self.corpus.train, self.config.seq_len)
    n = len(self.eval_inputs)
    return inp[:n], tgt[:n]

  def evaluate(self) -> float:
    """Mean held-out loss (nats/token) over every eval window."""
    b = self.config.batch_size
    total, count = 0.0, 0.0
    for s in range(0, len(self.eval_inputs), b):
      inp, tgt = self.eval_inputs[s:s + b], self.eval_targets[s:s + b]
      w = np.ones(tgt.shape, np.float32)
      if len(inp) < b:  # pad the last batch: one shape, one compilation
        pad = b - len(inp)
        inp, tgt = np.pad(inp, ((0, pad), (0, 0))), np.pad(tgt, ((0, pad), (0, 0)))
        w = np.pad(w, ((0, pad), (0, 0)))
      t, n = self._eval_step(self.state, (inp, tgt, w))
      total, count = total + float(t), count + float(n)
    return total / count

  # ---------------------------------------------------------------------------------- loop
  def run(self, steps: int | None = None) -> list[dict]:
    """Trains up to step `steps` (default config.steps), evaluating every `eval_every`
    steps and checkpointing every `checkpoint_every` steps and at the end."""
    c = self.config
    last = c.steps if steps is None else min(int(steps), c.steps)
    step = first = int(self.state.step)
    tokens_per_step = c.batch_size * c.seq_len
    t_start, timed_steps, timed_s = time.perf_counter(), 0, 0.0
    window: list[float] = []
    while step < last:
      t0 = time.perf_counter()
      self.state, metrics = self._train_step(self.state, self.batch(step))
      loss = float(metrics["loss"])  # waits for the step
      dt = time.perf_counter() - t0
      step += 1
      if step > first + 1:  # the first step of a run compiles
        timed_steps, timed_s = timed_steps + 1, timed_s + dt
      window.append(loss)
      record = None
      if step % c.eval_every == 0 or step == last:
        record = dict(step=step, loss=float(np.mean(window)), eval_loss=self.evaluate())
      elif step % c.log_every == 0:
        record = dict(step=step, loss=float(np.mean(window)))
      if record is not None:
        tok_s = tokens_per_step * timed_steps / timed_s if timed_s else 0.0
        record.update(lr=float(schedule(c)(step)), grad_norm=float(metrics["grad_norm"]),
                      tok_s=tok_s, elapsed_s=time.perf_counter() - t_start)
        self.history.append(record)
        window = []
        self.say(progress_line(record, last, tok_s, tokens_per_step))
      if step % c.checkpoint_every == 0 or step == last:
        self.save()
    return self.history

  def stage(self) -> Stage:
    """The current model as a Stage (for export or inference)."""
    return nnx.merge(self.graphdef, self.state.params, self.state.bias, self.state.fixed)


def progress_line(record: dict, last: int, tok_s: float, tokens_per_step: int) -> str:
  """`step 120/900 loss 3.412 eval 3.650 lr 2.9e-03 | 812 tok/s | 1:31 elapsed, ETA 5:40`."""
  step = record["step"]
  eta = (last - step) * tokens_per_step / tok_s if tok_s else 0.0
  ev = f" eval {record['eval_loss']:.3f}" if "eval_loss" in record else ""
  return (f"step {step}/{last} loss {record['loss']:.3f}{ev} lr {record['lr']:.1e} | "
          f"{tok_s:.0f} tok/s | {_mmss(record['elapsed_s'])} elapsed, ETA {_mmss(eta)}")


def _mmss(s: float) -> str:
  s = int(round(s))
  return f"{s // 60}:{s % 60:02d}"
