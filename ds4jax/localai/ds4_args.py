"""ds4-worker's argument spelling for scripts/worker.py (issue 16, worker CLI parity).

LocalAI's `local-ai worker ds4-distributed --ds4-args "..."` hands its words to ds4-worker:

    --role worker --model PATH --layers A:B --coordinator HOST PORT [-c CTX] [-t N]
    [--cpu|--cuda|--metal]

`translate(argv)` rewrites those words into the worker's absl flags (`--gguf=PATH`,
`--coordinator=HOST:PORT`, `--ctx=N`), so the same words start a ds4jax worker. Words it does
not know pass through unchanged (absl then names a bad one). Only the stdlib is used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

log = logging.getLogger("ds4jax.worker")

# ds4-worker flags with no ds4jax meaning, and how many values each takes.
_IGNORED = {"-t": 1, "--threads": 1, "--debug": 0, "--listen": 2, "--metal": 0}
_PLATFORMS = {"--cpu": "cpu", "--cuda": "cuda"}


class Ds4ArgsError(ValueError):
  """ds4-worker arguments that cannot be translated; one line, like ds4-worker's."""


def is_ds4_spelling(argv: Sequence[str]) -> bool:
  """True when the arguments use ds4-worker's spelling (`--role` or `--model`/`-m`, or a
  two-word `--coordinator HOST PORT`)."""
  args = list(argv)
  if any(a in ("--role", "--model", "-m") or a.startswith("--role=") for a in args):
    return True
  for k, a in enumerate(args[:-2]):
    if a == "--coordinator" and ":" not in args[k + 1] and args[k + 2].isdigit():
      return True
  return False


def translate(argv: Sequence[str], *, ctx_flag: str = "ctx") -> list[str]:
  """argv[0] plus the worker flags for ds4-worker's words (unchanged if not that spelling).

  `ctx_flag` is the worker's context-size flag name (`-c`/`--ctx` map to it). `--cpu` and
  `--cuda` set JAX_PLATFORMS for this process; `-t`, `--threads`, `--debug`, `--listen` and
  `--metal` are accepted and ignored (logged).
  """
  if not is_ds4_spelling(argv[1:]):
    return list(argv)
  out, args, k = [argv[0]], list(argv[1:]), 0

  def value(n: int = 1) -> list[str]:
    if k + n >= len(args) or any(v.startswith("--") for v in args[k + 1:k + 1 + n]):
      raise Ds4ArgsError(f"{args[k]} needs {'a value' if n == 1 else f'{n} values'}")
    return args[k + 1:k + 1 + n]

  role = None
  while k < len(args):
    a = args[k]
    if a.startswith("--role="):
      role, k = a.split("=", 1)[1], k + 1
      continue
    if a == "--role":
      role, k = value()[0], k + 2
    elif a in ("--model", "-m"):
      out.append(f"--gguf={value()[0]}")
      k += 2
    elif a == "--coordinator" and k + 1 < len(args) and ":" not in args[k + 1]:
      host, port = value(2)
      if not port.isdigit() or not 0 < int(port) < 65536:
        raise Ds4ArgsError(f"--coordinator {host} {port}: the port must be 1..65535")
      out.append(f"--coordinator={host}:{port}")
      k += 3
    elif a in ("-c", "--ctx"):
      out.append(f"--{ctx_flag}={value()[0]}")
      k += 2
    elif a in _PLATFORMS:
      os.environ["JAX_PLATFORMS"] = _PLATFORMS[a]
      k += 1
    elif a in _IGNORED:
      n = _IGNORED[a]
      log.info("ignoring ds4-worker flag %s%s", a, "".join(f" {v}" for v in value(n)) if n else "")
      k += 1 + n
    else:
      out.append(a)
      k += 1
  if role is not None and role != "worker":
    raise Ds4ArgsError(f"--role {role}: this is the worker; a coordinator is "
                       "scripts/generate.py/serve.py --listen or the LocalAI backend "
                       "(ds4_role:coordinator)")
  if not any(a.startswith("--gguf") for a in out[1:]):
    raise Ds4ArgsError("ds4-worker arguments need --model PATH")
  return out


def translate_or_exit(argv: Sequence[str], *, ctx_flag: str = "ctx") -> list[str]:
  """`translate`, with a bad argument as one line on stderr and exit status 2 (as ds4-worker)."""
  try:
    return translate(argv, ctx_flag=ctx_flag)
  except Ds4ArgsError as e:
    import sys
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
