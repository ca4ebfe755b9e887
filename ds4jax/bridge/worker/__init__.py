"""A stage served over the wire: `worker` dials the coordinator and runs the handshake and the
warm-up, `connection` serves one connection's frames on threads that trade roles, `work`
handles a WORK frame, `sessions` keeps each session's slot, tokens and prefix hashes,
`snapshots` exchanges session snapshots with the coordinator."""

from ds4jax.bridge.worker.worker import Worker, WorkerOptions

__all__ = ["Worker", "WorkerOptions"]
