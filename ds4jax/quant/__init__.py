"""Packed GGML weights on the device, dequantised inside jit (docs/design.md §8).

- `kernels`: `dequant_rows(rows_u8, qtype, n)`, one jax.numpy function per GGML block type,
  each bit-for-bit equal to `gguf.quants.dequantize`.
- `packed`: `Packed`, the pytree leaf holding one tensor's packed bytes.

Submodules are imported explicitly (`from ds4jax.quant import kernels`), so importing the
package stays cheap.
"""
