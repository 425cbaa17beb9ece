"""Independent naive references for the reduction ops, written from the papers'
descriptions with per-sample Python loops (deliberately not sharing code with
edgetok.reduce). The test oracle for every faster form."""
from __future__ import annotations

import math

import torch

EPS = 1e-6


def cos(u: torch.Tensor, v: torch.Tensor) -> float:
    u = u.double()
    v = v.double()
    return float(u @ v) / (max(float(u.norm()), EPS) * max(float(v.norm()), EPS))


def _best_matches(m, protect, valid=None):
    """For every unprotected A position: (best score, best B position), first max wins."""
    n = m.shape[0]
    valid = valid if valid is not None else [True] * n
    best = {}
    for i in range(0, n, 2):
        if i < protect or not valid[i]:
            continue
        bv, bj = -math.inf, None
        for j in range(1, n, 2):
            if j < protect or not valid[j]:
                continue
            s = cos(m[i], m[j])
            if s > bv:
                bv, bj = s, j
        if bj is not None:
            best[i] = (bv, bj)
    return best


def _assemble(xb, sb, protect, merged, valid=None):
    """Output rows [protected, unmerged A, B (with their merged A)] and sizes."""
    n = xb.shape[0]
    valid = valid if valid is not None else [True] * n
    rows, sizes = [], []
    for p in range(min(protect, n)):
        rows.append(xb[p])
        sizes.append(sb[p])
    for i in range(protect + (protect % 2), n, 2):
        if valid[i] and i not in merged:
            rows.append(xb[i])
            sizes.append(sb[i])
    for j in range(1, n, 2):
        if j < protect or not valid[j]:
            continue
        group = [j] + [i for i, dst in merged.items() if dst == j]
        total = sum(float(sb[g]) for g in group)
        rows.append(sum(xb[g].double() * float(sb[g]) for g in group) / total)
        sizes.append(torch.tensor([total]))
    return torch.stack([r.double() for r in rows]), torch.stack([s.double().reshape(1) for s in sizes])


def tome(x, metric, size, r, protect):
    if r == 0:  # no merge, no reordering (as ToMe does)
        return x.double(), size.double()
    xs, ss = [], []
    for b in range(x.shape[0]):
        best = _best_matches(metric[b], protect)
        ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))[:r]
        merged = {i: j for i, (_, j) in ranked}
        ox, os_ = _assemble(x[b], size[b, :, 0], protect, merged)
        xs.append(ox)
        ss.append(os_)
    return torch.stack(xs), torch.stack(ss)


def drop(x, score, keep, protect, fuse):
    outs, idxs = [], []
    n = x.shape[1]
    for b in range(x.shape[0]):
        rest = sorted(range(protect, n), key=lambda i: (-float(score[b, i]), i))
        kept = sorted(list(range(min(protect, n))) + rest[: keep - protect])
        rows = [x[b, i].double() for i in kept]
        if fuse:
            dropped = [i for i in range(n) if i not in kept]
            w = sum(float(score[b, i]) for i in dropped)
            total = sum((x[b, i].double() * float(score[b, i]) for i in dropped), torch.zeros(x.shape[2]).double())
            rows.append(total / max(w, EPS))
        outs.append(torch.stack(rows))
        idxs.append(torch.tensor(kept))
    return torch.stack(outs), torch.stack(idxs)


def dymu(x, metric, size, threshold, protect):
    """Returns a list per image of (x rows, sizes): the valid outputs only."""
    out = []
    for b in range(x.shape[0]):
        valid = [float(s) > 0 for s in size[b, :, 0]]
        best = _best_matches(metric[b], protect, valid)
        merged = {i: j for i, (v, j) in best.items() if v > threshold}
        out.append(_assemble(x[b], size[b, :, 0], protect, merged, valid))
    return out


def dtd(x, prev, threshold, protect):
    out = []
    for b in range(x.shape[0]):
        kept = [i for i in range(x.shape[1]) if i < protect or min(max(1.0 - cos(x[b, i], prev[b, i]), 0.0), 2.0) >= threshold]
        out.append((x[b, kept].double(), kept))
    return out
