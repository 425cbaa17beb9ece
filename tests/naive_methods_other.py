"""Independent naive references for tail drop, Focus-DETR, MrT5 and FlexDiT:
per-sample loops, explicit softmax, index lists built in Python. They use the
models' own layers (norms, linears) but none of edgetok's code."""
from __future__ import annotations

import torch


def softmax_attend(q, k, v, bias=None, scale=1.0):
    """One sample, all heads: q [H,M,D], k/v [H,N,D], bias broadcastable to [H,M,N]."""
    logits = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias
    w = torch.exp(logits - logits.max(-1, keepdim=True).values)
    return (w / w.sum(-1, keepdim=True)) @ v


def tail_drop_vit(model, x, layer: int, keep: int):
    """timm ViT where block ``layer`` keeps its first ``keep`` tokens after attention."""
    outs = []
    for img in x:
        h = model.norm_pre(model._pos_embed(model.patch_embed(img[None])))[0]
        for i, blk in enumerate(model.blocks):
            a = blk.attn
            n, c = h.shape
            qkv = a.qkv(blk.norm1(h)).view(n, 3, a.num_heads, a.head_dim).permute(1, 2, 0, 3)
            o = softmax_attend(qkv[0], qkv[1], qkv[2], scale=a.scale)
            h = h + blk.ls1(a.proj(o.transpose(0, 1).reshape(n, c)))
            if i == layer:
                h = h[:keep]
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        outs.append(model.forward_head(model.norm(h)[None]))
    return torch.cat(outs)


def focus_detr_encoder(enc, scorer_mlp, x, pos, mask, keeps):
    """DETR encoder where layer l updates only its top-``keeps[l]`` tokens by the
    foreground score sigmoid(mlp(x)) (padding -1), all tokens as keys/values."""
    outs = []
    for b in range(x.shape[0]):
        h, p = x[b], pos[b]
        valid = [bool(m) for m in mask[b]]
        s = torch.sigmoid(scorer_mlp(h)[:, 0]).tolist()
        s = [si if vi else -1.0 for si, vi in zip(s, valid)]
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))
        kbias = torch.tensor([0.0 if vi else torch.finfo(h.dtype).min for vi in valid])
        for layer, keep in zip(enc.layers, keeps):
            sel = sorted(order[:keep])
            a = layer.self_attn
            hd, heads = a.head_dim, h.shape[1] // a.head_dim
            hq = h[sel]
            q = a.q_proj(hq + p[sel]).view(len(sel), heads, hd).transpose(0, 1)
            k = a.k_proj(h + p).view(-1, heads, hd).transpose(0, 1)
            v = a.v_proj(h).view(-1, heads, hd).transpose(0, 1)
            o = softmax_attend(q, k, v, kbias, a.scaling).transpose(0, 1).reshape(len(sel), -1)
            u = layer.self_attn_layer_norm(hq + a.o_proj(o))
            u = layer.final_layer_norm(u + layer.mlp(u))
            h = h.clone()
            for j, i in enumerate(sel):
                h[i] = u[j]
        outs.append(h)
    return torch.stack(outs)


def multiscale_foreground_score(mlp, alpha, x, shapes, mask):
    """Focus-DETR top-down score of one sample: levels scored coarsest first, each finer
    level's features scaled by (1 + alpha * upsampled score above); sigmoid; padding -1."""
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    logits = [None] * len(shapes)
    for lvl in range(len(shapes) - 1, -1, -1):
        h, w = shapes[lvl]
        feats = x[starts[lvl]:starts[lvl + 1]]
        if lvl + 1 < len(shapes):
            hh, ww = shapes[lvl + 1]
            grid = logits[lvl + 1].view(1, 1, hh, ww)
            up = torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True).reshape(-1)
            feats = torch.stack([f * (1 + alpha[lvl] * u) for f, u in zip(feats, up)])
        logits[lvl] = mlp(feats)[:, 0]
    s = torch.sigmoid(torch.cat(logits)).tolist()
    return [si if bool(m) else -1.0 for si, m in zip(s, mask)]


def focus_deformable_detr_encoder(enc, scorer, kwargs, keeps):
    """Deformable-DETR encoder where layer l updates only its top-``keeps[l]`` tokens: each
    layer runs in full on all tokens (a query's output does not depend on the other
    queries), and only the selected rows of its output are kept."""
    x, mask = kwargs["inputs_embeds"], kwargs["attention_mask"]
    shapes = [tuple(int(v) for v in s) for s in kwargs["spatial_shapes_list"]]
    ref = enc.get_reference_points(tuple(shapes), kwargs["valid_ratios"], device=x.device)
    layer_kw = {k: kwargs[k] for k in ("spatial_shapes", "spatial_shapes_list", "level_start_index")}
    chosen = []
    for b in range(x.shape[0]):
        s = multiscale_foreground_score(scorer.mlp, scorer.alpha, x[b], shapes, mask[b])
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))
        chosen.append([set(order[:k]) for k in keeps])
    h = x
    for li, layer in enumerate(enc.layers):
        full = layer(h, mask, spatial_position_embeddings=kwargs["spatial_position_embeddings"],
                     reference_points=ref, **layer_kw)
        h = torch.stack([torch.stack([full[b, i] if i in chosen[b][li] else h[b, i] for i in range(h.shape[1])])
                         for b in range(h.shape[0])])
    return h


def mrt5_encoder(model, ids, mask, layer: int, gate_norm, gate_proj, k: float):
    """T5 encoder with MrT5 hard deletion after block ``layer``: per sample, the
    tokens with k*sigmoid(proj(norm(h))) >= k/2 (and not padding) go on, with their
    original relative positions. Returns a list of [M_b, C] outputs (kept tokens only)."""
    enc = model.encoder
    outs = []
    for b in range(ids.shape[0]):
        keep = [i for i in range(ids.shape[1]) if mask[b, i]]
        h = enc.embed_tokens(ids[b])
        n = h.shape[0]
        full_bias = enc.block[0].layer[0].SelfAttention.compute_bias(n, n)[0]
        alive = list(range(n))  # positions still in the sequence (padding kept as masked keys)
        for i, blk in enumerate(enc.block):
            sa = blk.layer[0]
            a = sa.SelfAttention
            m = len(alive)
            bias = full_bias[:, alive][:, :, alive].clone()
            for j, pos in enumerate(alive):
                if pos not in keep:
                    bias[:, :, j] = bias[:, :, j] + torch.finfo(h.dtype).min
            x = sa.layer_norm(h)
            q, kk, v = (p(x).view(m, a.n_heads, a.key_value_proj_dim).transpose(0, 1) for p in (a.q, a.k, a.v))
            h = h + a.o(softmax_attend(q, kk, v, bias).transpose(0, 1).reshape(m, -1))
            h = blk.layer[1](h)
            if i == layer:
                g = k * torch.sigmoid(gate_proj(gate_norm(h))[:, 0])
                rows = [j for j, pos in enumerate(alive) if pos in keep and float(g[j]) >= k / 2]
                alive = [alive[j] for j in rows]
                keep = alive
                h = h[rows]
        outs.append(enc.final_layer_norm(h))
    return outs


def flexdit(model, x, t, y, start: int, end: int, factor: int):
    """DiT with blocks [start, end) run on f x f average-pooled tokens; each dense
    token then adds its cell's update."""
    outs = []
    g = model.grid
    for b in range(x.shape[0]):
        h = model.embed(x[b:b + 1])[0]
        c = model.condition(t[b:b + 1], y[b:b + 1])
        for i, blk in enumerate(model.blocks):
            if factor > 1 and i == start:
                gs = g // factor
                cells = []
                for r in range(gs):
                    for col in range(gs):
                        members = [(r * factor + dr) * g + col * factor + dc
                                   for dr in range(factor) for dc in range(factor)]
                        cells.append(members)
                s_in = torch.stack([h[m].mean(0) for m in cells])
                s = s_in
            if factor > 1 and start <= i < end:
                s = blk(s[None], c)[0]
                if i == end - 1:
                    h = h.clone()
                    for ci, members in enumerate(cells):
                        for m in members:
                            h[m] = h[m] + (s[ci] - s_in[ci])
            else:
                h = blk(h[None], c)[0]
        outs.append(model.unpatchify(model.final_layer(h[None], c)))
    return torch.cat(outs)
