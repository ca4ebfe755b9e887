"""The one builder (docs/design.md §0, floor 7): a user's path (a GGUF file or an orbax
checkpoint directory), layer ranges, devices and dtype -> stage runners -> a backend
(`LocalBackend`, a listening `Coordinator`) or a `Worker`, always compile-first.

    from ds4jax import build
    backend = build.local_backend("model.gguf", ctx_size=4096, max_sessions=8)
    coord = build.coordinator("model.gguf", layers="0:1", listen="0.0.0.0:7000")
    w = build.worker("model.gguf", "2:output", ("10.0.0.1", 7000))
    model = build.load_model("model.gguf")      # `ds4jax.load_model`: the notebook API

Scripts (through `ds4jax.cli`), the OpenAI server's model process, LocalAI, the benchmarks
and the notebooks all build here; `runtime` and `bridge` hold no builders of their own.
"""

from ds4jax.build.backends import (attach_kv_disk, check_port_free, coordinator, local_backend,
                                   parse_hostport, requested_range, worker)
from ds4jax.build.stages import compile_serving, load_model, load_runner, max_chunk_for

__all__ = ["attach_kv_disk", "check_port_free", "compile_serving", "coordinator", "load_model", "load_runner",
           "local_backend", "max_chunk_for", "parse_hostport", "requested_range", "worker"]
