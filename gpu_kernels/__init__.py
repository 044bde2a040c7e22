"""Triton kernels for the GPU side: attention (flash/paged/MLA), fused MoE, norms, RoPE."""
