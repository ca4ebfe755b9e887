"""Splitting a model over hosts: balanced contiguous layer ranges (`plan`), what each host
holds in memory (`memory`), and a GGUF's summary with a split suggestion (`summary`)."""
