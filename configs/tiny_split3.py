r"""The tiny model split in 3 stages on this machine: coordinator 0:1, workers 2:2 and 3:output.

One command (starts both workers as child processes, streams, checks against one process):

    python scripts/demo.py --config=configs/tiny_split3.py

By hand, in three terminals (start order does not matter):

    python scripts/make_tiny_gguf.py --out=/tmp/tiny.gguf
    python scripts/worker.py --gguf=/tmp/tiny.gguf --layers=2:2 --coordinator=127.0.0.1:7070
    python scripts/worker.py --gguf=/tmp/tiny.gguf --layers=3:output --coordinator=127.0.0.1:7070
    python scripts/generate.py --config=configs/tiny_split3.py --gguf=/tmp/tiny.gguf

Every process must load the same file (the model fingerprint is checked at HELLO).
"""

import pathlib
import runpy


def get_config():
  # configs/tiny_local.py (model, prompt, greedy sampling) plus the split; configs/ is not a
  # package, so it is loaded by path.
  tiny_local = runpy.run_path(str(pathlib.Path(__file__).with_name("tiny_local.py")))
  c = tiny_local["get_config"]()
  # The coordinator's own slice; the workers below own the rest, in order, the last the head.
  c.layers = "0:1"
  c.workers = ["2:2", "3:output"]
  c.listen = "127.0.0.1:7070"
  c.route_timeout = 60.0
  c.activation_dtype = "f32"
  # Workers compile this chunk shape before READY; 16 covers the short demo prompts.
  c.prefill_chunk = 16
  return c
