"""A loaded model: the model process, its tokenizer and the serving engine around it.

The tokenizer (and the GGUF checks) run in `tokenizer_proc`, and the model (LocalBackend, or
a listening Coordinator for `ds4_role:coordinator`) runs in
`ds4jax.serving.model_proc`, the child process `scripts/serve.py` uses, so the gRPC process
never imports JAX: XLA compilation holds the GIL for seconds, and Health must answer at once
(docs/serving.md, "Why the model runs in a child process"). Requests reuse serve.py's
`serving.engine.Engine`: the route wait polls the route snapshot the model process pushes
(never blocking the event loop), a slot semaphore caps concurrent generations, and each
request is its own backend session through the same route.
"""

from __future__ import annotations

import logging
import os

from ds4jax.localai import status as status_lib
from ds4jax.localai.options import LoadError, LoadSpec, fit_to_model
from ds4jax.localai.tokenizer_proc import TokenizerProcess

log = logging.getLogger("ds4jax.localai")


class LoadedModel:
  """One LoadModel's worth of state; `start` blocks until the model process is ready."""

  def __init__(self, spec: LoadSpec, process, tokenizer):
    from ds4jax.serving.engine import Engine
    self.spec = spec
    self.process = process
    self.tokenizer = tokenizer  # a TokenizerProcess: call it off the event loop
    self.engine = Engine(process, route_timeout=spec.route_timeout,
                         max_concurrency=spec.max_concurrency)
    self.listen: str | None = None
    self.active = 0  # requests waiting for the route or generating

  @classmethod
  def start(cls, spec: LoadSpec, *, cache_dir: str | None = None,
            env: dict[str, str] | None = None) -> LoadedModel:
    from ds4jax.serving.remote import ModelProcess, ModelProcessError
    tokenizer = TokenizerProcess(spec.path, env=env)  # checks the GGUF; LoadError if bad
    try:
      spec = fit_to_model(spec, n_layers=tokenizer.n_layers,
                          context_length=tokenizer.context_length)
      process = ModelProcess(spec.model_args(cache_dir), env=env)
    except BaseException:
      tokenizer.close()
      raise
    try:
      ready = process.wait_ready()
    except BaseException as e:
      process.close()
      tokenizer.close()
      if isinstance(e, ModelProcessError):
        raise LoadError(f"ds4: {e}") from None
      raise
    model = cls(spec, process, tokenizer)
    model.listen = ready.get("listen")
    return model

  @property
  def exited(self) -> str | None:
    """Why the model process is gone, or None while it runs."""
    if self.process.proc.poll() is None:
      return None
    return self.process.exited or f"the model process exited (code {self.process.proc.returncode})"

  def describe(self) -> str:
    mode = (f"coordinator of layers {self.spec.layers}, workers dial {self.listen}"
            if self.spec.coordinator else "the whole model in one process")
    return f"ds4jax: loaded {os.path.basename(self.spec.path)} ({mode}, ctx {self.spec.ctx_size})"

  def memory(self) -> tuple[int, dict[str, int]]:
    route = self.process.route_info().get("route") or []

    def pid(p):
      return p.pid if p.poll() is None else None

    return status_lib.memory(route, self.tokenizer.layer_bytes, self.tokenizer.n_layers,
                             model_process=pid(self.process.proc),
                             tokenizer_process=pid(self.tokenizer.proc))

  def close(self) -> None:
    self.engine.close()
    self.process.close()
    self.tokenizer.close()
