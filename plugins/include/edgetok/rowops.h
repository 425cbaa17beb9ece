// Per-row logic of the edgetok reduction ops, shared by the CUDA kernels and the
// CPU test library (compiled by nvcc as __host__ __device__, by g++ as plain C++).
//
// The op contract (edgetok/reduce/{tome,drop,dymu}.py are the references):
//  - token_merge: A = even tokens, B = odd tokens; cosine similarity with the
//    norm clamped at 1e-6; protected rows/columns score -inf; each A row takes
//    its best B (first index on ties); the r rows with the highest best score
//    merge (stable: ties -> lower index); output [protected, unmerged A, B].
//  - token_drop: top-`keep` by score (protected first, stable ties), emitted in
//    index order; optional fused token = score-weighted mean of the dropped.
//  - threshold_merge: every A row whose best score > threshold merges; size 0
//    marks padding; valid outputs compacted to the front, zero padded.
//
// Every function works on one image. Functions taking (tid, nt) are one phase
// of a block-parallel loop: a kernel calls them with (threadIdx.x, blockDim.x)
// and a barrier between phases, the CPU library with (0, 1). That is how the
// CPU tests exercise the very code the kernels run.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define ET_HD __host__ __device__ __forceinline__
#else
#define ET_HD inline
#endif

namespace edgetok {

constexpr float kNormEps = 1e-6f;  // metric / max(||metric||, eps)
constexpr float kWeightEps = 1e-6f;  // fused token and threshold-merge divisors

// Loads and stores in fp32: fp16/bf16 tensors are computed in fp32 and rounded once.
template <class T> struct Num;
template <> struct Num<float> {
    ET_HD static float load(float v) { return v; }
    ET_HD static float store(float v) { return v; }
};
#if defined(__CUDACC__)
template <> struct Num<__half> {
    ET_HD static float load(__half v) { return __half2float(v); }
    ET_HD static __half store(float v) { return __float2half_rn(v); }
};
template <> struct Num<__nv_bfloat16> {
    ET_HD static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
    ET_HD static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
#endif

// Sizes of the bipartite sets (A = even, B = odd positions) and of their protected parts.
struct Split {
    int na, nb, pa, pb;
};
ET_HD Split split(int n, int protect_first) {
    return Split{(n + 1) / 2, n / 2, (protect_first + 1) / 2, protect_first / 2};
}

// The most A rows one step may merge (mirrors edgetok.reduce.tome.max_merges).
ET_HD int max_merges(int n, int protect_first) {
    Split s = split(n, protect_first);
    return s.nb - s.pb <= 0 ? 0 : s.na - s.pa;
}

// Norm of a metric row, clamped. Sequential order on purpose: every token's norm is
// computed the same way whether it is an A row or a B column, so exact ties between
// duplicate tokens stay exact ties.
ET_HD float clamped_norm(const float* v, int n, int stride) {
    float s = 0.f;
    for (int k = 0; k < n; ++k) s += v[k * stride] * v[k * stride];
    return fmaxf(sqrtf(s), kNormEps);
}

// Cosine score of one (A row, B column) pair; symmetric in its arguments.
ET_HD float pair_score(float dot, float norm_a, float norm_b, bool allowed) {
    return allowed ? dot / (norm_a * norm_b) : -INFINITY;
}

// Argmax update with "first index wins on ties": is (s, j) better than (best, best_j)?
ET_HD bool better_match(float s, int j, float best, int best_j) {
    return s > best || (s == best && j < best_j);
}

// Position of element i in a stable descending sort of s[0..n).
ET_HD int stable_rank_desc(const float* s, int n, int i) {
    float v = s[i];
    int rank = 0;
    for (int j = 0; j < n; ++j) rank += (s[j] > v) || (s[j] == v && j < i);
    return rank;
}

// ---------------------------------------------------------------------------
// Merge plan (token_merge and threshold_merge) for one image.
//
// Inputs: best[na], bidx[na] from the match phase; valid flags (size > 0) for the
// threshold op, or null for token_merge (every token valid).
// Plan arrays (shared memory in the kernels):
//   merged[na]       1 if A row i merges into B column bidx[i]
//   out_src[cap]     source of output row q: token t (< n) copied, n + j = merged B column j,
//                    -1 = padding
//   boff[nb + 1]     merged sources of B column j are blist[boff[j] .. boff[j+1])
//   blist[na]        A rows, grouped by destination, ascending inside a group
// ---------------------------------------------------------------------------
struct MergePlanArgs {
    int n, protect_first;
    const float* best;
    const int* bidx;
    const unsigned char* valid;  // [n] or null
    int r;                       // token_merge: merge count; < 0 selects threshold mode
    float threshold;
};

// Phase 1: which A rows merge.
ET_HD void plan_merged(const MergePlanArgs& a, int* merged, int tid, int nt) {
    Split s = split(a.n, a.protect_first);
    for (int i = tid; i < s.na; i += nt) {
        if (a.r >= 0)
            merged[i] = stable_rank_desc(a.best, s.na, i) < a.r;
        else
            merged[i] = a.best[i] > a.threshold;  // -inf rows (protected, padding) never merge
    }
}

ET_HD bool token_valid(const MergePlanArgs& a, int t) { return a.valid == nullptr || a.valid[t]; }

// Number of output rows of one image (after phase 1).
ET_HD int plan_count(const MergePlanArgs& a, const int* merged) {
    Split s = split(a.n, a.protect_first);
    int count = 0;
    for (int t = 0; t < a.protect_first && t < a.n; ++t) count += token_valid(a, t);
    for (int i = s.pa; i < s.na; ++i) count += token_valid(a, 2 * i) && !merged[i];
    for (int j = s.pb; j < s.nb; ++j) count += token_valid(a, 2 * j + 1);
    return count;
}

// Phase 2: output slot of every candidate, and the group offsets of merged sources.
// Candidates in output order: protected tokens, A rows >= pa that did not merge, B columns >= pb,
// each kept only if valid; slots are the running count of kept candidates.
ET_HD void plan_slots(const MergePlanArgs& a, const int* merged, int* out_src, int* boff, int tid, int nt) {
    Split s = split(a.n, a.protect_first);
    int k = a.protect_first < a.n ? a.protect_first : a.n;
    int kept_prot = 0, kept_a = 0;
    for (int t = 0; t < k; ++t) kept_prot += token_valid(a, t);
    for (int i = s.pa; i < s.na; ++i) kept_a += token_valid(a, 2 * i) && !merged[i];
    for (int t = tid; t < k; t += nt) {
        if (!token_valid(a, t)) continue;
        int slot = 0;
        for (int u = 0; u < t; ++u) slot += token_valid(a, u);
        out_src[slot] = t;
    }
    for (int i = s.pa + tid; i < s.na; i += nt) {
        if (merged[i] || !token_valid(a, 2 * i)) continue;
        int slot = kept_prot;
        for (int u = s.pa; u < i; ++u) slot += token_valid(a, 2 * u) && !merged[u];
        out_src[slot] = 2 * i;
    }
    for (int j = s.pb + tid; j < s.nb; j += nt) {
        if (!token_valid(a, 2 * j + 1)) continue;
        int slot = kept_prot + kept_a;
        for (int u = s.pb; u < j; ++u) slot += token_valid(a, 2 * u + 1);
        out_src[slot] = a.n + j;
    }
    for (int j = tid; j <= s.nb; j += nt) {
        int off = 0;
        for (int i = 0; i < s.na; ++i) off += merged[i] && a.bidx[i] < j;
        boff[j] = off;
    }
}

// Phase 3: merged sources grouped by destination column, ascending inside a group.
ET_HD void plan_lists(const MergePlanArgs& a, const int* merged, const int* boff, int* blist, int tid, int nt) {
    Split s = split(a.n, a.protect_first);
    for (int j = tid; j < s.nb; j += nt) {
        int c = boff[j];
        for (int i = 0; i < s.na; ++i)
            if (merged[i] && a.bidx[i] == j) blist[c++] = i;
    }
}

// Output value of row `src` (an out_src entry) at channel c: a copy, or the size-weighted
// mean of B column j and the A rows merged into it. x and size point at one image.
template <class T>
ET_HD float merge_value(const T* x, const T* size, int n, int C, int c, int src, const int* boff,
                        const int* blist, bool clamp) {
    if (src < 0) return 0.f;
    if (src < n) return Num<T>::load(x[(long)src * C + c]);
    int j = src - n, t = 2 * j + 1;
    float w = Num<T>::load(size[t]);
    float acc = Num<T>::load(x[(long)t * C + c]) * w, wsum = w;
    for (int e = boff[j]; e < boff[j + 1]; ++e) {
        int u = 2 * blist[e];
        float wu = Num<T>::load(size[u]);
        acc += Num<T>::load(x[(long)u * C + c]) * wu;
        wsum += wu;
    }
    return acc / (clamp ? fmaxf(wsum, kWeightEps) : wsum);
}

template <class T>
ET_HD float merge_size(const T* size, int n, int src, const int* boff, const int* blist) {
    if (src < 0) return 0.f;
    if (src < n) return Num<T>::load(size[src]);
    int j = src - n;
    float s = Num<T>::load(size[2 * j + 1]);
    for (int e = boff[j]; e < boff[j + 1]; ++e) s += Num<T>::load(size[2 * blist[e]]);
    return s;
}

// ---------------------------------------------------------------------------
// Drop plan (token_drop) for one image: kept[n], out_src[keep] (token of output row q).
// ---------------------------------------------------------------------------

// Does token u come before token t in the ranking? Protected tokens first (index order,
// as the reference's +inf ties), then by score descending, ties -> lower index.
ET_HD bool ranks_before(const float* score, int protect_first, int u, int t) {
    bool pu = u < protect_first, pt = t < protect_first;
    if (pu != pt) return pu;
    if (pu) return u < t;
    return score[u] > score[t] || (score[u] == score[t] && u < t);
}

// Phase 1: kept flags.
ET_HD void drop_kept(const float* score, int n, int keep, int protect_first, int* kept, int tid, int nt) {
    for (int t = tid; t < n; t += nt) {
        int rank = 0;
        for (int u = 0; u < n; ++u) rank += ranks_before(score, protect_first, u, t);
        kept[t] = rank < keep;
    }
}

// Phase 2: output row of every kept token (index order).
ET_HD void drop_slots(const int* kept, int n, int* out_src, int tid, int nt) {
    for (int t = tid; t < n; t += nt) {
        if (!kept[t]) continue;
        int slot = 0;
        for (int u = 0; u < t; ++u) slot += kept[u];
        out_src[slot] = t;
    }
}

// The fused token at channel c: sum(score * x) / max(sum(score), eps) over dropped tokens.
template <class T>
ET_HD float drop_fused_value(const T* x, const float* score, const int* kept, int n, int C, int c) {
    float acc = 0.f, wsum = 0.f;
    for (int t = 0; t < n; ++t) {
        if (kept[t]) continue;
        acc += score[t] * Num<T>::load(x[(long)t * C + c]);
        wsum += score[t];
    }
    return acc / fmaxf(wsum, kWeightEps);
}

}  // namespace edgetok
