"""ds4 GGUF files: the name table, validated reading, dequantisation, slice loading, writing.

- `names`: the one GGUF-name -> parameter-path table (docs/design.md §2).
- `reader`: `open_gguf`, `read_config`, `fingerprint` over gguf-py's memory-mapped reader.
- `dequant`: GGML types -> numpy through gguf-py, bit-exact.
- `load`: `load_tensors(path, layers)` reads only a slice's tensors.
- `split`, `writer`: split files, ds4-layout writing (whole or streamed).
- `table`: a file's tensor table (types, dims, bytes) from its config and quant recipe alone.
- `tiny`: the random tiny models (`--gguf=tiny` / `bench`, the test fixtures, Flash-dims files).
- `hf`: the one HF converter (HF -> GGUF, and a GGUF's weights in HF transformers).
- `errors`: the one-line `GGUFError`s.

Submodules are imported explicitly (`from ds4jax.gguf import load`), so importing the package
stays cheap.
"""
