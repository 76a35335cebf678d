"""Multi-head latent attention (DeepSeek-V2/V3) over a paged cache of latents: the cache write and one attention op
for any mix of prefill chunks and decode steps.

Per layer the cache is one tensor [num_blocks, block_size, 1, kv_lora_rank + rope_dim]: each token's normed kv latent
and its rotated rope key, the only per-token state MLA needs (576 values a token and layer for DeepSeek-V3, against
2 x 128 heads x 192 for the keys and values it stands for). Keys and values are the latent through kv_b_proj, per head
[k_nope | v]; a query head's score is q_nope.k_nope + q_rope.k_rope."""
import torch
import torch.nn.functional as F

from .attention import sequences_of, write_kv


def write_latent(latent: torch.Tensor, rope_key: torch.Tensor, cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Store each token's latent [T, rank] and rotated rope key [T, rope_dim] at slot_mapping[t] (-1: skipped)."""
    entry = torch.cat([latent, rope_key], dim=-1).unsqueeze(1)
    write_kv(entry, entry, cache, cache, slot_mapping)  # one tensor: it is both caches of the (k, v) write op


def mla_attention(q_nope: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, kv_b_proj: torch.Tensor,
                  block_table: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor, max_query_len: int,
                  scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new queries (q_nope [T, H, nope], q_rope [T, H, rope], rotated) over its
    cached latents (written by write_latent; block_table, seq_lens, query_start as paged_attention takes them).
    kv_b_proj: [H * (nope + v_dim), rank]. Returns [T, H, v_dim]; rows no sequence owns are zeros.

    A pure decode step takes the absorbed path: kv_b_proj's key half folds into the query and its value half applies
    after attention, so attention runs as multi-query attention over the latents themselves and no step expands
    the whole context into per-head keys and values (that expansion costs context x rank x H x (nope + v) per
    step, the absorbed query H x nope x rank per token). A step with prefill expands the context once: its many
    queries then score against per-head keys of 192 values instead of latents of 576 (DeepSeek-V3's sizes)."""
    heads, nope = q_nope.shape[1], q_nope.shape[2]
    rank = cache.shape[-1] - q_rope.shape[-1]
    kv_b = kv_b_proj.view(heads, -1, rank)  # per head: nope rows of the key, then v_dim rows of the value
    if max_query_len <= 1:
        query = torch.cat([torch.einsum("thn,hnr->thr", q_nope, kv_b[:, :nope]), q_rope], dim=-1)
        out = mla_decode_reference(query, cache, rank, block_table, seq_lens, query_start, scale)
        return torch.einsum("thr,hvr->thv", out, kv_b[:, nope:])
    return mla_attention_expanded(q_nope, q_rope, cache, kv_b_proj, block_table, seq_lens, query_start, scale)


def mla_decode_reference(query: torch.Tensor, cache: torch.Tensor, rank: int, block_table: torch.Tensor,
                         seq_lens: torch.Tensor, query_start: torch.Tensor, scale: float) -> torch.Tensor:
    """Absorbed attention of at most one new token per sequence (query [T, H, rank + rope]) over its latent entries:
    the H heads are H queries against one shared key/value head, so no per-head copy of the keys, and every token at
    once over the block table's whole width, masked past its sequence's length: no host sync, so a CUDA graph
    captures it. Rows no sequence owns are zeros. [T, H, rank]

    Its cost and scratch memory grow with the table's width (under CUDA graphs, the whole context bound) rather than
    with each sequence's length: the reference a Triton MLA decode kernel would be checked against, once `bench
    layer --shapes deepseek_v3` on a GPU shows how far this stays from its floor."""
    tokens, block_size = query.shape[0], cache.shape[1]
    token_ids = torch.arange(tokens, device=query.device)
    seq_of = torch.searchsorted(query_start[1:].long(), token_ids, right=True).clamp(max=block_table.shape[0] - 1)
    offsets = torch.arange(block_size, device=query.device)
    slots = (block_table[seq_of].long()[:, :, None] * block_size + offsets).flatten(1)  # [T, width * block_size]
    visible = (torch.arange(slots.shape[1], device=query.device)[None, :] < seq_lens[seq_of][:, None]) & (
        token_ids < query_start[-1])[:, None]
    # [T, context bound, rank + rope]; slots past a sequence's end may hold anything, even NaN: zeroed
    entries = cache.flatten(0, 2)[slots].masked_fill(~visible[:, :, None], 0.0)
    scores = torch.einsum("thd,tcd->thc", query, entries).float() * scale
    probs = torch.softmax(scores.masked_fill(~visible[:, None, :], float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("thc,tcr->thr", probs.to(query.dtype), entries[..., :rank])


def mla_attention_expanded(q_nope: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, kv_b_proj: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Per sequence: its latents through kv_b_proj into per-head keys and values, then scaled_dot_product_attention
    with a causal mask offset by the cached context: transformers' DeepseekV3Attention, op for op (the reference
    of the exactness tests)."""
    tokens, heads, nope = q_nope.shape
    rank = cache.shape[-1] - q_rope.shape[-1]
    v_dim = kv_b_proj.shape[0] // heads - nope
    out = q_nope.new_zeros(tokens, heads, v_dim)
    query = torch.cat([q_nope, q_rope], dim=-1)
    for start, end, slots, mask in sequences_of(block_table, seq_lens, query_start, cache.shape[1]):
        entries = cache.flatten(0, 1)[slots, 0]  # [context, rank + rope]
        context = entries.shape[0]
        latent, rope_key = entries[:, :rank], entries[:, rank:]
        k_nope, value = (latent @ kv_b_proj.T).view(context, heads, nope + v_dim).split([nope, v_dim], dim=-1)
        key = torch.cat([k_nope, rope_key.unsqueeze(1).expand(context, heads, -1)], dim=-1)
        out[start:end] = F.scaled_dot_product_attention(query[start:end].transpose(0, 1), key.transpose(0, 1),
                                                        value.transpose(0, 1), attn_mask=mask,
                                                        scale=scale).transpose(0, 1)
    return out
