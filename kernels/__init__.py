"""Triton kernels for the MoE hot path, each beside its torch reference (CPU tensors use the reference)."""
