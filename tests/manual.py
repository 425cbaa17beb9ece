"""A hand-written timm ViT forward with reduction, for tests: explicit softmax
attention (proportional attention as in the ToMe paper) and the naive
reference ops, sharing no code with edgetok.patch."""
from __future__ import annotations

import torch

import naive


def attention(blk, h, size, prop_attn):
    a = blk.attn
    b, n, c = h.shape
    qkv = a.qkv(h).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q @ k.transpose(-2, -1)) * a.scale
    if size is not None:
        if prop_attn:
            logits = logits + size.log()[:, None, None, :, 0]
        else:
            logits = logits.masked_fill(size[:, None, None, :, 0] <= 0, float("-inf"))
    attn = logits.softmax(-1)
    o = (attn @ v).transpose(1, 2).reshape(b, n, -1)
    return a.proj(o), k.mean(1), attn


def forward(model, x, step, prop_attn=True):
    """``step(layer, x, size, metric, attn) -> (x, size)`` or None for no reduction."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    size = None
    for i, blk in enumerate(model.blocks):
        o, metric, attn = attention(blk, blk.norm1(x), size, prop_attn)
        x = x + blk.ls1(o)
        res = step(i, x, size if size is not None else torch.ones_like(x[..., :1]), metric, attn)
        if res is not None:
            x, size = res
            x, size = x.float(), size.float()
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    out = model.norm(x)
    if model.global_pool == "avg" and size is not None:
        # merged tokens count once per patch they stand for (the weighting edgetok documents)
        p = model.num_prefix_tokens
        pooled = (out[:, p:] * size[:, p:]).sum(1) / size[:, p:].sum(1)
        return model.head(model.fc_norm(pooled)), x, size
    return model.forward_head(out), x, size


def tome_step(rs, protect):
    def step(i, x, size, metric, attn):
        return naive.tome(x, metric, size, rs[i], protect) if rs[i] else None

    return step


def drop_step(keeps, protect, fuse):
    def step(i, x, size, metric, attn):
        if keeps[i] is None:
            return None
        score = attn[:, :, 0].mean(1)  # class token's attention, averaged over heads
        out, idx = naive.drop(x, score, keeps[i], protect, fuse)
        kept = size.gather(1, idx[..., None])
        if fuse:
            kept = torch.cat([kept, size.sum(1, keepdim=True) - kept.sum(1, keepdim=True)], 1)
        return out, kept

    return step
