r"""DeepSeek V4 Flash on a 2-host route of 4-GPU hosts: each host one stage over its 4 GPUs.

Within a host the stage is one SPMD program over a 4-device mesh: the routed experts are
sharded over the GPUs (64 of Flash's 256 per GPU), everything else is replicated
(docs/design.md §12). Between the hosts the socket bridge carries the HC state.

Host A (coordinator; embedding, layers 0:21, tokenizer, sampling; the only open port):

    python scripts/generate.py --config=configs/flash_2x4gpu.py \
        --config.gguf=/models/DeepSeek-V4-Flash-q2.gguf --prompt="Why is the sky blue?"

Host B (worker; layers 22:output and the head from `workers`, its 4 GPUs from `devices`):

    python scripts/worker.py --config=configs/flash_2x4gpu.py \
        --config.gguf=/models/DeepSeek-V4-Flash-q2.gguf --coordinator=HOST_A:7000

The same launch lines with flags only: add `--devices=4` (or `--devices=all`) to
configs/flash_two_hosts.py's commands. Both hosts hold the same GGUF; each loads only its
slice and each GPU only its experts' bytes: per GPU ~10.0 GB of experts plus 4.7 GB (host
A) / 4.1 GB (host B) replicated (attention, router, shared experts, embedding, head), from
`gguf.table` for ds4's q2 mix, against 44.6 / 42.1 GB for the whole stage on one device.
"""

import pathlib
import runpy


def get_config():
  # configs/flash_two_hosts.py (the model, the split, sampling) plus the devices of a stage.
  two_hosts = runpy.run_path(str(pathlib.Path(__file__).with_name("flash_two_hosts.py")))
  c = two_hosts["get_config"]()
  # GPUs per stage, on both hosts (scripts/generate.py and scripts/worker.py read it); it
  # must divide Flash's 256 experts. "all" takes every local device.
  c.devices = 4
  # Where the worker dials (scripts/worker.py; override with --coordinator=HOST:PORT).
  c.coordinator = "host-a:7000"
  return c
