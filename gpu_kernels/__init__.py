"""Triton kernels for the GPU side: attention (flash/paged/MLA), fused MoE, norms, RoPE.

Each module imports Triton: import them where a GPU (or Triton's interpreter, TRITON_INTERPRET=1)
is in use; this package itself imports nothing. Launchers check shapes (KernelInputError, a
ValueError) and take block sizes from tuning.py; none reads a value back from the GPU, so a
decode step of them can be captured in a CUDA graph. Tensors on one device; float ones in
float32, float16 or bfloat16; int ones int32 or int64.

- flash_attention.flash_attention(q [tokens, heads, d], k [kv_tokens, kv_heads, d],
  v [kv_tokens, kv_heads, dv], cu_seqlens_q [seqs+1], cu_seqlens_kv [seqs+1], max_q_len, scale)
  -> [tokens, heads, dv]: causal prefill, queries = the last q_len positions of each sequence.
- paged_attention.paged_decode_attention(q [seqs, heads, d], k_store [kv_heads, rows, d],
  v_store [kv_heads, rows, dv], block_tables [seqs, max_blocks], context_lens [seqs],
  block_size, scale, splits=None) -> [seqs, heads, dv]: PagedKVCache's layout; any table of
  pages in order (a compacted selection too, context_lens counting its tokens).
- mla_decode.mla_decode(q_latent [seqs, heads, rank], q_rope [seqs, heads, rope],
  latent_store [rows, rank], rope_store [rows, rope], block_tables, context_lens, block_size,
  scale, splits=None) -> [seqs, heads, rank]: absorbed MLA over the latent cache.
- fused_moe.fused_moe(x [tokens, hidden], gate_up [E, 2*inter, hidden], down [E, hidden, inter],
  expert_ids [tokens, k] (-1: a pair run elsewhere, adds nothing), expert_weights [tokens, k])
  -> [tokens, hidden]; weights float or
  fused_moe.StoredExperts(uint8 [E, rows, row_bytes], GGMLQuantizationType.Q8_0 or Q4_K).
- rmsnorm.rmsnorm(x [tokens, hidden], weight [hidden], eps) -> [tokens, hidden];
  rmsnorm.add_rmsnorm(x, residual, weight, eps) -> (normed, x + residual).
- rope.rope(q [tokens, heads, d], k [tokens, kv_heads, d] | None, positions [tokens],
  cos_sin_cache [max_pos, rot_dim], interleaved=False, inplace=False) -> (q, k);
  rope.build_cos_sin_cache(inv_freq [rot_dim/2], max_positions, scaling) (YaRN: its inv_freq
  and mscale)."""
