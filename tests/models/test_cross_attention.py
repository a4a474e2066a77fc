"""Cross-attention against a written-out reference, on CPU's two code paths (short: written out; long: SDPA)."""

from __future__ import annotations

import pytest
import torch

from medssl.models import CrossAttention, CrossBlock
from medssl.models.blocks import key_padding_mask


def _reference(attn: CrossAttention, queries, context, valid=None):
    """Per head: softmax(q k^T / sqrt(hd)) v, one head and one image at a time."""
    b, nq, d = queries.shape
    h, hd = attn.num_heads, attn.head_dim
    q = queries @ attn.q.weight.T + attn.q.bias
    kv = context @ attn.kv.weight.T + attn.kv.bias
    k, v = kv[..., :d], kv[..., d:]
    out = torch.zeros(b, nq, d)
    for i in range(b):
        for j in range(h):
            s = slice(j * hd, (j + 1) * hd)
            logits = q[i, :, s] @ k[i, :, s].T / hd**0.5
            if valid is not None:
                logits[:, ~valid[i]] = float("-inf")
            out[i, :, s] = logits.softmax(-1) @ v[i, :, s]
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


@pytest.mark.parametrize("context_len", [7, 300])  # below and above CPU_SHORT_TOKENS
@pytest.mark.parametrize("context_dim", [None, 12])
def test_cross_attention_matches_the_reference(context_len, context_dim):
    torch.manual_seed(0)
    attn = CrossAttention(16, 4, context_dim=context_dim)
    queries, context = torch.randn(2, 5, 16), torch.randn(2, context_len, context_dim or 16)
    valid = torch.rand(2, context_len) > 0.3
    valid[:, 0] = True
    with torch.no_grad():
        torch.testing.assert_close(attn(queries, context), _reference(attn, queries, context), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(attn(queries, context, key_padding_mask(valid)), _reference(attn, queries, context, valid),
                                   atol=1e-5, rtol=1e-4)
        weights = attn.weights(queries, context, key_padding_mask(valid))
    assert weights.shape == (2, 4, 5, context_len)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 5))
    assert float(weights[~valid[:, None, None, :].expand_as(weights)].abs().max()) == 0.0  # masked keys get no weight


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_cross_block_reads_image_tokens_and_trains(spatial_dims):
    """Object queries over the tokens of a 2D or 3D ViT: output per query, gradient into both sides."""
    from medssl.models import ViT

    torch.manual_seed(0)
    vit = ViT(spatial_dims, patch_size=4, size="micro")
    block = CrossBlock(32, 4, context_dim=vit.embed_dim)
    queries = torch.randn(2, 3, 32, requires_grad=True)
    out = block(queries, vit(torch.rand(2, 1, *[8] * spatial_dims)))
    assert out.shape == (2, 3, 32)
    out.square().mean().backward()
    assert queries.grad.abs().sum() > 0 and vit.patch_embed.weight.grad.abs().sum() > 0
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_a_query_only_sees_the_context_it_is_allowed():
    """Changing context tokens a query may not look at leaves that query's output unchanged."""
    torch.manual_seed(0)
    block = CrossBlock(16, 2, self_attention=False).eval()
    queries, context = torch.randn(1, 2, 16), torch.randn(1, 6, 16)
    valid = torch.tensor([[True, True, True, False, False, False]])
    changed = context.clone()
    changed[:, 3:] = torch.randn(1, 3, 16)  # (a constant shift would vanish in the context LayerNorm)
    with torch.no_grad():
        torch.testing.assert_close(block(queries, context, key_padding_mask(valid)), block(queries, changed, key_padding_mask(valid)))
        assert not torch.allclose(block(queries, context), block(queries, changed))
