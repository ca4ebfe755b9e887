"""Orbax stage checkpoints (`orbax_io`) and topology-neutral session snapshots (`snapshots`,
`stage_state`, and `snapshot_bridge` for the split route), both directories marked by a JSON
manifest (`manifest`); see docs/design.md §7."""
