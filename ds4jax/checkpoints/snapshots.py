"""Session snapshots: a session's transcript, prefix hash and decode state, per layer, on disk.

Like ds4's distributed save/load (ds4-distributed-reference.md §3.6) the state is gathered
**per layer** from whatever stages hold it, and re-split per layer on restore, so a snapshot
taken on one route restores on a route with other split points, or in one process.

    save_session(backend, sid, "snap/", transcript=ids)   # LocalBackend or Coordinator
    ids = load_session(backend, sid2, "snap/")           # sid2 now holds the KV of ids[:n_kv]

Directory layout:

    DIR/snapshot.json     manifest: model fingerprint and config, tokens (the transcript),
                          n_kv (positions whose state is saved: tokens[:n_kv]), the ds4 FNV
                          prefix hash of tokens[:n_kv], a hash of the whole transcript, the
                          state dtype, and per layer {file, nbytes, sha256, fields}
    DIR/layer_NNN.bin     the layer's state rows (see `stage_state`)

Why raw files + a JSON manifest rather than orbax here: the bytes arrive from workers over
the bridge already serialised and are written as they are (no device arrays on the
coordinator); a restore reads only the layers a stage owns; every file carries a sha256
(orbax does not checksum data), and bfloat16 state needs no numpy extension type on disk.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any, Sequence

from ds4jax.checkpoints import manifest, stage_state
from ds4jax.checkpoints.stage_state import LayerBlob, StateError

MANIFEST = "snapshot.json"
FORMAT = "ds4jax-session-snapshot"
VERSION = 1


class SnapshotError(StateError):
  """A snapshot that is missing, corrupt, or does not fit the backend it is loaded into."""


def _fnv(tokens: Sequence[int]) -> str:
  from ds4jax.wire import protocol  # stdlib + numpy only
  return protocol.hash_hex(protocol.fnv1a64(tokens))


# -------------------------------------------------------------------------------- writing
def check_target(directory, *, overwrite: bool = False) -> pathlib.Path:
  """The absolute path a snapshot may be written to (SnapshotError if `directory` exists and
  is not a snapshot, or exists at all without `overwrite`). Cheap: scripts call it before a
  long run, so a bad path fails at once rather than after the run."""
  return manifest.check_target(directory, name=MANIFEST, what="session snapshot",
                               error=SnapshotError, overwrite=overwrite)


def write_snapshot(directory, *, cfg, fingerprint: str | None, tokens: Sequence[int], n_kv: int,
                   blobs: dict[int, LayerBlob], overwrite: bool = False) -> dict[str, Any]:
  """Writes a snapshot directory (atomically: a temp directory renamed into place)."""
  tokens = [int(t) for t in tokens]
  if not 0 <= n_kv <= len(tokens):
    raise SnapshotError(f"n_kv={n_kv} is outside the {len(tokens)}-token transcript")
  missing = [il for il in range(cfg.n_layers) if il not in blobs]
  if missing:
    raise SnapshotError(f"no state for layer {missing[0]}: the stages do not cover the model")
  out = check_target(directory, overwrite=overwrite)
  dtypes = {f["dtype"] for b in blobs.values() for f in b.meta["fields"]}
  layers = {}
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    for il in range(cfg.n_layers):
      b = blobs[il]
      name = f"layer_{il:03d}.bin"
      (tmp / name).write_bytes(b.data)
      layers[str(il)] = dict(b.meta, file=name)
    manifest = {
        "format": FORMAT, "version": VERSION, "fingerprint": fingerprint,
        "config": cfg.to_dict(), "n_layers": cfg.n_layers, "tokens": tokens, "n_kv": n_kv,
        "prefix_hash": _fnv(tokens[:n_kv]), "transcript_hash": _fnv(tokens),
        "state_dtype": dtypes.pop() if len(dtypes) == 1 else sorted(dtypes),
        "layers": layers, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest))
    if out.exists():
      shutil.rmtree(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


# -------------------------------------------------------------------------------- reading
def read_manifest(directory, *, cfg=None, fingerprint: str | None = None) -> dict[str, Any]:
  """The checked manifest; with cfg/fingerprint, also checks that it is of that model."""
  where = f"snapshot {directory}"
  m = manifest.read_manifest(directory, name=MANIFEST, fmt=FORMAT, version=VERSION,
                             what="session snapshot", error=SnapshotError, where=where)
  tokens, n_kv = m.get("tokens"), m.get("n_kv")
  if (not isinstance(tokens, list) or not all(isinstance(t, int) and t >= 0 for t in tokens)
      or not isinstance(n_kv, int) or not 0 <= n_kv <= len(tokens)):
    raise SnapshotError(f"{where}: corrupt manifest (tokens / n_kv)")
  # The timeline hashes catch an edited transcript (the layer checksums cover the state).
  if m.get("prefix_hash") != _fnv(tokens[:n_kv]) or m.get("transcript_hash") != _fnv(tokens):
    raise SnapshotError(f"{where}: the transcript does not match its prefix hash (corrupt)")
  if not isinstance(m.get("layers"), dict):
    raise SnapshotError(f"{where}: corrupt manifest (layers)")
  if cfg is not None:
    if m.get("n_layers") != cfg.n_layers or m.get("config") != json.loads(
        json.dumps(cfg.to_dict())):
      raise SnapshotError(f"{where} is of another model (its config differs from this one's)")
    if max(tokens, default=0) >= cfg.vocab_size:
      raise SnapshotError(f"{where}: token id {max(tokens)} >= vocab {cfg.vocab_size}")
  if fingerprint and m.get("fingerprint") and m["fingerprint"] != fingerprint:
    raise SnapshotError(f"{where} is of another model (fingerprint {m['fingerprint'][:16]}, "
                        f"this one is {fingerprint[:16]})")
  return m


def read_layers(directory, m: dict[str, Any], layers) -> dict[int, LayerBlob]:
  """The blobs of `layers` (absolute indices), size- and sha256-checked."""
  d = pathlib.Path(directory)
  out = {}
  for il in layers:
    e = m["layers"].get(str(il))
    if not isinstance(e, dict) or not isinstance(e.get("file"), str):
      raise SnapshotError(f"snapshot {d}: no state for layer {il}")
    p = d / os.path.basename(e["file"])
    try:
      data = p.read_bytes()
    except OSError as err:
      raise SnapshotError(f"snapshot {d}: cannot read layer {il} ({err.strerror})") from None
    if len(data) != e.get("nbytes") or stage_state.sha256(data) != e.get("sha256"):
      raise SnapshotError(f"snapshot {d}: layer {il} state fails its size/sha256 check (corrupt)")
    out[il] = LayerBlob({k: v for k, v in e.items() if k != "file"}, data)
  return out


# ------------------------------------------------------------------------------- backends
def save_session(backend, sid: str, directory, *, transcript: Sequence[int] | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
  """Saves session `sid` of a backend (`runtime.types.Backend`: local or a coordinator, which
  gathers its workers' layers); returns the manifest.

  `transcript` (default: the tokens the state holds) may extend past the state by tokens not
  computed yet (e.g. the last sampled one); it must start with the state's tokens.
  """
  held, blobs = backend.export_session(sid)
  tokens = list(held) if transcript is None else [int(t) for t in transcript]
  if tokens[:len(held)] != list(held):
    raise SnapshotError(f"session {sid} holds a state for tokens that are not a prefix of the "
                        "given transcript")
  return write_snapshot(directory, cfg=backend.cfg, fingerprint=backend.fingerprint,
                        tokens=tokens, n_kv=len(held), blobs=blobs, overwrite=overwrite)


def load_session(backend, sid: str, directory) -> list[int]:
  """Restores a snapshot into session `sid` (replacing its state); returns the transcript."""
  m = read_manifest(directory, cfg=backend.cfg, fingerprint=backend.fingerprint)
  tokens, n_kv = m["tokens"], m["n_kv"]
  if n_kv > backend.ctx_size:
    raise SnapshotError(f"snapshot {directory} holds {n_kv} positions, more than this "
                        f"backend's context {backend.ctx_size}")
  backend.import_session(sid, tokens[:n_kv], lambda layers: read_layers(directory, m, layers))
  return list(tokens)
