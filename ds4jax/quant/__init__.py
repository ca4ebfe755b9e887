"""Packed GGML weights on the device, dequantised inside jit (docs/design.md §8).

- `kernels`: `dequant_rows(rows_u8, qtype, n)`, one jax.numpy function per GGML block type,
  each bit-for-bit equal to `gguf.quants.dequantize`.
- `packed`: `Packed`, the pytree leaf holding one tensor's packed bytes.
- `source`: `TensorSource` / `Stored`, the interface a weight source (a GGUF, an orbax
  checkpoint) gives the loader: the tensors of a slice, packed, by parameter path.

Submodules are imported explicitly (`from ds4jax.quant import kernels`), so importing the
package stays cheap.
"""
