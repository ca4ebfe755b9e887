"""Orbax stage checkpoints (`orbax_io`) and topology-neutral session snapshots (`snapshots`,
`stage_state`), both directories marked by a JSON manifest (`manifest`); see docs/design.md §7.
A split route's snapshot moves over the bridge: bridge/{coordinator,worker}/snapshots.py."""
