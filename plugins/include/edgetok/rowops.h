// Per-token logic of the edgetok reduction ops, shared by the CUDA kernels and the
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
// plan.h builds each image's plan (who merges or stays, where every output row comes
// from) out of these pieces; the output kernels then only gather with merge_value.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

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

// Order-preserving key of a score: a > b exactly when key(a) > key(b), -0 ties +0, and NaN is
// above +inf, as in torch.sort (the references rank with it).
ET_HD uint32_t order_key(float f) {
    if (f != f) return 0xffffffffu;
    if (f == 0.f) f = 0.f;  // -0 -> +0
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Sort key (ascending) of element i ranked by score descending, ties to the lower index.
// Distinct for distinct i, so any correct sort of these keys gives the one stable ranking.
ET_HD uint64_t rank_key(float score, int i) {
    return (uint64_t)(~order_key(score)) << 32 | (uint32_t)i;
}
// Sort key of merged A row i grouped under destination column j (ascending row inside a group).
ET_HD uint64_t group_key(uint32_t j, int i) { return (uint64_t)j << 32 | (uint32_t)i; }
ET_HD int key_index(uint64_t k) { return (int)(uint32_t)k; }

// Output value of row `src` (a plan entry) at channel c: token src copied (src < n), or
// the size-weighted mean of B column j = src - n and the A rows merged into it
// (blist[boff[j] .. boff[j+1])). x and size point at one image.
template <class T>
ET_HD float merge_value(const T* x, const T* size, int n, int C, int c, int src, const int* boff,
                        const int* blist, bool clamp) {
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
    if (src < n) return Num<T>::load(size[src]);
    int j = src - n;
    float s = Num<T>::load(size[2 * j + 1]);
    for (int e = boff[j]; e < boff[j + 1]; ++e) s += Num<T>::load(size[2 * blist[e]]);
    return s;
}

}  // namespace edgetok
