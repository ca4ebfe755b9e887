"""The GGUF checks and the tokenizer, in a small child process of the gRPC server.

Why a process: opening a real ds4 GGUF takes seconds of Python/numpy work, and building its
129k-token BPE holds the GIL for about half a second in one Rust call (measured: Health
stalled ~1 s while a 9.5 GB Flash GGUF was checked in the server's interpreter). Here the
server only exchanges JSON lines with this process (no pickle):

  child -> server (once)  {"ok": true, "n_layers", "context_length", "vocab_size",
                           "layer_bytes": [embed, [per layer...], head] | null}
                          {"ok": false, "message": "one line"}   (then it exits 2)
  server -> child         {"op": "encode", "text": s, "bos": b}
                          {"op": "chat", "messages": [[role, text], ...], "thinking": b}
                          {"op": "decode", "ids": [...]}
  child -> server         {"ids": [...]} | {"text": s} | {"error": "one line"}

    tok = TokenizerProcess("m.gguf")       # LoadError if it is not a ds4 GGUF
    tok.encode("Hi", add_bos=True); tok.chat_prompt([("user", "Hi")]); tok.decode(ids)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import Any
from collections.abc import Sequence

from ds4jax.errors import one_line
from ds4jax.localai.options import LoadError


def model_info(path: str):
  """(info, Tokenizer): what the server needs to know about the model at `path` (the first
  message's fields) and its tokenizer; ValueError/OSError if it is not a ds4 GGUF (or ds4jax
  checkpoint directory) with ds4's vocab."""
  from ds4jax.runtime import sources
  if os.path.isdir(path):  # a ds4jax checkpoint: its reader imports JAX (fine here)
    cfg, sizes = sources.model_info(path)[0], None
  else:  # the reader's errors first: "not a GGUF file", wrong architecture, missing keys
    from ds4jax.gguf.reader import open_gguf
    f = open_gguf(path)
    cfg = f.cfg
    embed, per_layer, head = f.layer_bytes()
    sizes = [int(embed), [int(b) for b in per_layer], int(head)]
  tok = sources.open_tokenizer(path)
  return {"n_layers": int(cfg.n_layers), "context_length": int(cfg.context_length),
          "vocab_size": int(tok.vocab_size), "layer_bytes": sizes}, tok


def _serve(path: str) -> int:
  out = sys.stdout
  try:
    info, tok = model_info(path)
  except (ValueError, OSError) as e:
    msg = one_line(e)
    out.write(json.dumps({"ok": False, "message": msg if path in msg else f"{path}: {msg}"})
              + "\n")
    out.flush()
    return 2
  out.write(json.dumps({"ok": True, **info}) + "\n")
  out.flush()
  for line in sys.stdin:
    req = json.loads(line)
    try:
      if req["op"] == "encode":
        reply = {"ids": tok.encode(req["text"], add_bos=bool(req["bos"]))}
      elif req["op"] == "chat":
        reply = {"ids": tok.chat_prompt([tuple(m) for m in req["messages"]],
                                        thinking=bool(req["thinking"]))}
      elif req["op"] == "decode":
        reply = {"text": tok.decode(req["ids"])}
      else:
        reply = {"error": f"unknown op {req['op']!r}"}
    except (ValueError, KeyError, TypeError) as e:
      reply = {"error": one_line(e)}
    out.write(json.dumps(reply, ensure_ascii=False) + "\n")
    out.flush()
  return 0


class TokenizerProcess:
  """The server's handle on the child: a blocking, thread-safe Tokenizer look-alike (call it
  from a worker thread, e.g. asyncio.to_thread)."""

  def __init__(self, path: str, *, env: dict[str, str] | None = None):
    self.proc = subprocess.Popen([sys.executable, "-m", "ds4jax.localai.tokenizer_proc", path],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 encoding="utf-8", env=env)
    self._lock = threading.Lock()
    first = self.proc.stdout.readline()
    try:
      hello = json.loads(first)
    except ValueError:
      self.close()
      raise LoadError(f"ds4: cannot read {path}: the model check exited "
                      f"(code {self.proc.returncode})") from None
    if not hello.get("ok"):
      self.close()
      raise LoadError(f"ds4: {hello.get('message', 'cannot load ' + path)}")
    self.n_layers = int(hello["n_layers"])
    self.context_length = int(hello["context_length"])
    self.vocab_size = int(hello["vocab_size"])
    lb = hello.get("layer_bytes")
    self.layer_bytes = None if lb is None else (lb[0], lb[1], lb[2])

  def _call(self, req: dict[str, Any]) -> dict[str, Any]:
    with self._lock:
      if self.proc.poll() is not None:
        raise RuntimeError(f"the tokenizer process exited (code {self.proc.returncode})")
      self.proc.stdin.write(json.dumps(req, ensure_ascii=False) + "\n")
      self.proc.stdin.flush()
      line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError("the tokenizer process exited")
    reply = json.loads(line)
    if "error" in reply:
      raise ValueError(reply["error"])
    return reply

  def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
    return self._call({"op": "encode", "text": text, "bos": add_bos})["ids"]

  def chat_prompt(self, messages: Sequence[tuple[str, str]], *, thinking: bool = False
                  ) -> list[int]:
    return self._call({"op": "chat", "messages": [list(m) for m in messages],
                       "thinking": thinking})["ids"]

  def decode(self, ids: Sequence[int]) -> str:
    return self._call({"op": "decode", "ids": [int(i) for i in ids]})["text"]

  def close(self) -> None:
    if self.proc.stdin and not self.proc.stdin.closed:
      try:
        self.proc.stdin.close()
      except OSError:
        pass
    try:
      self.proc.wait(5)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
    if self.proc.stdout:
      self.proc.stdout.close()


if __name__ == "__main__":
  if len(sys.argv) != 2:
    print("usage: python -m ds4jax.localai.tokenizer_proc GGUF", file=sys.stderr)
    sys.exit(2)
  sys.exit(_serve(sys.argv[1]))
