"""Independent naive references for the ViT/VLM token methods (DivPrune, HiRED,
Zero-TPrune, DiffRate, Self-slimmed ViT, MustDrop), written from the papers'
descriptions with per-sample Python loops in float64 and sharing no code with
edgetok.reduce. Each ``*_step`` plugs into tests/manual.py's hand-written forward."""
from __future__ import annotations

import math

import torch

EPS = 1e-6


def _cos(u, v) -> float:
    return float(u @ v) / (max(float(u.norm()), EPS) * max(float(v.norm()), EPS))


def _argmax(values) -> int:
    best, at = -math.inf, 0
    for i, v in enumerate(values):
        if v > best:
            best, at = v, i
    return at


def _top(values, k) -> list[int]:
    """Indices of the k largest values, ties to the lower index."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


# -- DivPrune: greedy max-min diversity ------------------------------------
def divprune(feats, picks: int) -> list[int]:
    f = feats.double()
    m = f.shape[0]
    d = [[1.0 - _cos(f[i], f[j]) for j in range(m)] for i in range(m)]
    nearest = [min([d[i][j] for j in range(m) if j != i] or [math.inf]) for i in range(m)]
    chosen = [_argmax(nearest)]
    while len(chosen) < picks:
        dist_to_set = [-math.inf if i in chosen else min(d[s][i] for s in chosen) for i in range(m)]
        chosen.append(_argmax(dist_to_set))
    return chosen


# -- HiRED: per-partition budgets -------------------------------------------
def hired(attn, picks: int, grid, parts) -> list[int]:
    gh, gw = grid
    ph, pw = parts
    a = [float(v) for v in attn.double()]
    part_of = [(i // gw) * ph // gh * pw + (i % gw) * pw // gw for i in range(gh * gw)]
    members = {p: [i for i in range(len(a)) if part_of[i] == p] for p in range(ph * pw)}
    total = sum(a)
    chosen = []
    for p, idx in members.items():
        share = sum(a[i] for i in idx) / total
        budget = min(int(math.floor(share * picks)), len(idx))
        chosen += [idx[j] for j in _top([a[i] for i in idx], budget)]
    rest = [i for i in range(len(a)) if i not in chosen]
    chosen += [rest[j] for j in _top([a[i] for i in rest], picks - len(chosen))]
    return chosen


# -- Zero-TPrune: weighted PageRank + similarity pruning ---------------------
def page_rank(attn, iterations: int) -> list[float]:
    """attn [H,N,N]: s_j <- sum_i A[i,j] s_i from uniform, per head, mean over heads."""
    h, n, _ = attn.shape
    a = attn.double()
    out = [0.0] * n
    for head in range(h):
        s = [1.0 / n] * n
        for _ in range(iterations):
            s = [sum(float(a[head, i, j]) * s[i] for i in range(n)) for j in range(n)]
        for j in range(n):
            out[j] += s[j] / h
    return out


def zero_tprune(attn, metric, r_imp: int, r_sim: int, iterations: int, protect: int) -> list[int]:
    """Kept unprotected positions (offset by ``protect``)."""
    imp = page_rank(attn, iterations)[protect:]
    m = len(imp)
    order = _top(imp, m)  # most important first
    survivors = order[: m - r_imp]
    n_src = len(survivors) // 2
    targets, sources = survivors[: len(survivors) - n_src], survivors[len(survivors) - n_src :]
    met = metric.double()[protect:]
    best = [-math.inf] * m
    for s in sources:
        best[s] = max(_cos(met[s], met[t]) for t in targets)
    pruned = set(_top(best, r_sim)) if r_sim else set()
    return [protect + i for i in survivors if i not in pruned]


# -- DiffRate: prune by class attention, merge into important tokens ---------
def diffrate(x, size, cls_attn, metric, prune: int, merge: int, protect: int):
    x, size, imp, met = x.double(), size.double(), [float(v) for v in cls_attn], metric.double()
    n = x.shape[0]
    ranked = [math.inf if i < protect else imp[i] for i in range(n)]
    kept = sorted(_top(ranked, n - prune))
    x, size, met = x[kept], size[kept], met[kept]
    ranked = [ranked[i] for i in kept]
    n = len(kept)
    if merge:
        order = _top(ranked, n)
        dst, src = sorted(order[: n - merge]), order[n - merge :]
        sums = {d: x[d] * size[d] for d in dst}
        sizes = {d: float(size[d]) for d in dst}
        for s in src:
            sims = [-math.inf if d < protect else _cos(met[s], met[d]) for d in dst]
            d = dst[_argmax(sims)]
            sums[d] = sums[d] + x[s] * size[s]
            sizes[d] += float(size[s])
        x = torch.stack([sums[d] / sizes[d] for d in dst])
        size = torch.tensor([[sizes[d]] for d in dst], dtype=torch.float64)
    return x, size


# -- Self-slimmed ViT: soft aggregation --------------------------------------
def slim(x, size, logits, protect: int):
    """x [N,C], logits [N-protect, M] -> protected tokens, then M tokens sum_n softmax_n(logits[:,m]) x_n."""
    x, size, lg = x.double(), size.double(), logits.double()
    body, bsize = x[protect:], size[protect:]
    rows, sizes = [x[i] for i in range(protect)], [size[i] for i in range(protect)]
    n_in, n_out = lg.shape
    weights = []  # weights[m][n]: softmax over the input tokens n of logits[:, m]
    for m in range(n_out):
        col = [float(lg[n, m]) for n in range(n_in)]
        top = max(col)
        w = [math.exp(v - top) for v in col]
        weights.append([v / sum(w) for v in w])
    for m in range(n_out):
        rows.append(sum(weights[m][n] * body[n] for n in range(n_in)))
        # input n's patches are shared among the outputs in proportion to its weights
        sizes.append(sum(weights[m][n] / sum(weights[k][n] for k in range(n_out)) * bsize[n] for n in range(n_in)))
    return torch.stack(rows), torch.stack(sizes)


# -- MustDrop: neighbour pair merging -----------------------------------------
def pair_merge(x, size, metric, r: int, protect: int, grid):
    gh, gw = grid
    x, size, met = x.double(), size.double(), metric.double()
    pairs = [(protect + row * gw + 2 * c, protect + row * gw + 2 * c + 1) for row in range(gh) for c in range(gw // 2)]
    sims = [_cos(met[a], met[b]) for a, b in pairs]
    chosen = [pairs[i] for i in _top(sims, r)]
    rows, sizes, gone = list(x), list(size), set()
    for a, b in chosen:
        total = size[a] + size[b]
        rows[a] = (x[a] * size[a] + x[b] * size[b]) / total
        sizes[a] = total
        gone.add(b)
    keep = [i for i in range(x.shape[0]) if i not in gone]
    return torch.stack([rows[i] for i in keep]), torch.stack([sizes[i] for i in keep])


# -- steps for manual.forward ---------------------------------------------------
def _per_sample(fn):
    def run(x, size, *per):
        outs = [fn(b, x[b], size[b], *(t[b] for t in per)) for b in range(x.shape[0])]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])

    return run


def selection_step(layers: dict, protect: int, select):
    """``select(b, x, size, metric, attn) -> kept positions``; kept in original order."""

    def step(i, x, size, metric, attn):
        if i not in layers:
            return None

        def one(b, xb, sb, mb, ab):
            kept = sorted(select(layers[i], xb, sb, mb, ab))
            return xb.double()[kept], sb.double()[kept]

        return _per_sample(one)(x, size, metric, attn)

    return step


def divprune_step(keeps: dict, protect: int):
    def select(keep, x, size, metric, attn):
        return list(range(protect)) + [protect + j for j in divprune(metric[protect:], keep - protect)]

    return selection_step(keeps, protect, select)


def hired_step(layer: int, keep: int, protect: int, grid, parts):
    def select(keep, x, size, metric, attn):
        a = attn[:, 0, protect:].double().mean(0) if protect else attn.double().mean((0, 1))[protect:]
        return list(range(protect)) + [protect + j for j in hired(a, keep - protect, grid, parts)]

    return selection_step({layer: keep}, protect, select)


def zero_tprune_step(rs: dict, protect: int, iterations: int):
    def select(r, x, size, metric, attn):
        return list(range(protect)) + zero_tprune(attn, metric, r[0], r[1], iterations, protect)

    return selection_step(rs, protect, select)


def diffrate_step(rates: dict, protect: int):
    def step(i, x, size, metric, attn):
        if i not in rates:
            return None
        cls = attn[:, :, 0].double().mean(1) if protect else attn.double().mean((1, 2))
        return _per_sample(lambda b, xb, sb, cb, mb: diffrate(xb, sb, cb, mb, *rates[i], protect))(x, size, cls, metric)

    return step


def slim_step(layers: dict, protect: int):
    """``layers[i]`` is the slimming module (tokens -> logits) used at layer i."""

    def step(i, x, size, metric, attn):
        if i not in layers:
            return None
        logits = layers[i](x[:, protect:]).detach()
        return _per_sample(lambda b, xb, sb, lb: slim(xb, sb, lb, protect))(x, size, logits)

    return step


def mustdrop_step(merge_layer: int, r: int, drop_layers: dict, protect: int, grid):
    def step(i, x, size, metric, attn):
        if i == merge_layer:
            return _per_sample(lambda b, xb, sb, mb: pair_merge(xb, sb, mb, r, protect, grid))(x, size, metric)
        if i in drop_layers:
            cls = attn[:, :, 0].double().mean(1) if protect else attn.double().mean((1, 2))

            def one(b, xb, sb, cb):
                ranked = [math.inf if j < protect else float(cb[j]) for j in range(xb.shape[0])]
                kept = sorted(_top(ranked, drop_layers[i]))
                return xb.double()[kept], sb.double()[kept]

            return _per_sample(one)(x, size, cls)
        return None

    return step
