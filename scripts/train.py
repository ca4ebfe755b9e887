r"""Trains a small DeepSeek V4 on Python's help topics and exports it as a ds4 GGUF.

    python scripts/train.py --config=configs/train_docs.py \
        --workdir=/tmp/ds4jax-train-docs --out=ds4jax/data/docs.gguf

Checkpoints, the vocab and the loss history go to --workdir; running the command again
resumes from the last checkpoint (a finished run only exports again). --out gets the ds4
quant mix (Q8_0 projections and experts, F16 elsewhere); the workdir also gets the f32 and
the q2-expert variants, and --report (default: --out with .json) the loss curve, the
held-out perplexity of each variant, the unigram baseline, tok/s and the wall time.
"""

import os
import sys
import time

import jax
from absl import flags
from ml_collections import config_flags

from ds4jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/train_docs.py",
                                          "A training config (configs/train_docs.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, vocab and history.",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "The GGUF to write (ds4 quant mix).", required=True)
_REPORT = flags.DEFINE_string("report", None, "The run report (default: --out with .json).")
_EXPORT = flags.DEFINE_boolean("export", True, "Export and measure after training.")


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.setup_logging()
  from absl import logging
  logging.info("jax %s on %s", jax.__version__, ", ".join(str(d) for d in jax.devices()))
  from ds4jax.train import trainer as trainer_lib  # deferred: after the flags parse
  say = lambda m: print(m, file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  trainer = trainer_lib.Trainer(_CONFIG.value, _WORKDIR.value, say=say)
  trainer.run()
  train_s = time.perf_counter() - t0
  if not _EXPORT.value:
    return 0
  from ds4jax.train import export
  report = _REPORT.value or os.path.splitext(_OUT.value)[0] + ".json"
  command = " ".join(["python", "scripts/train.py"] + sys.argv[1:])
  export.export_run(trainer, _OUT.value, report, command=command, wall_s=train_s, say=say)


if __name__ == "__main__":
  cli.run(main)
