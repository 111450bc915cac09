"""bf16 attention on the CPU through matrix products, for sam2's attention layers.

torch's CPU flash-attention kernel gains almost nothing from bfloat16 (a memory-attention cross-attention of 1,024
queries over 7,200 memory tokens: 43 ms fp32, 40 ms bf16 on 2 cores), while two bf16 matrix products and a
softmax take 25 ms: the memory attention is most of a propagation step after the image encoder. sam2 1.1.0 calls
`F.scaled_dot_product_attention` from its transformer module, so that module's `F` is given a view of
torch.nn.functional whose attention takes this path for CPU bf16 inputs only; every other call is torch's own.
"""

from __future__ import annotations

import types


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
    """torch's attention, or for CPU bf16 without mask and dropout: softmax(q kᵀ / √d) v in bf16 products."""
    import torch
    import torch.nn.functional as F

    plain = attn_mask is None and not dropout_p and not is_causal and not kwargs.keys() - {"scale"}
    if not (plain and query.device.type == "cpu" and query.dtype == key.dtype == value.dtype == torch.bfloat16):
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, **kwargs)
    scale = kwargs.get("scale") or query.shape[-1] ** -0.5
    return (query @ (key.transpose(-2, -1) * scale)).softmax(dim=-1) @ value


def use_in_sam2() -> None:
    """Route the attention calls of sam2's transformer module through scaled_dot_product_attention."""
    import torch.nn.functional
    from sam2.modeling.sam import transformer

    if transformer.F.scaled_dot_product_attention is not scaled_dot_product_attention:
        transformer.F = types.SimpleNamespace(
            **{**vars(torch.nn.functional), "scaled_dot_product_attention": scaled_dot_product_attention}
        )
