// CPU build of the kernels' per-row logic (rowops.h), for tests without a GPU.
//
// Each op runs the same phases as its kernel, in the same order, sequentially
// (tid = 0, nt = 1), on float32 tensors. tests/test_plugins.py loads this library
// with ctypes and compares it with the torch references in edgetok/reduce.
// The match phase mirrors match_kernel: clamped norms, sequential dot products,
// first-index argmax.
#include <stdint.h>

#include <algorithm>
#include <vector>

#include "edgetok/launch.h"
#include "edgetok/rowops.h"

#define EDGETOK_HOST_API extern "C" __attribute__((visibility("default")))

using namespace edgetok;

namespace {

void match_image(const float* m, const float* size, int n, int ck, int pf, float* best, int* bidx) {
    Split s = split(n, pf);
    std::vector<float> norm(n);
    for (int t = 0; t < n; ++t) norm[t] = clamped_norm(m + (long)t * ck, ck, 1);
    for (int i = 0; i < s.na; ++i) {
        const bool row_ok = i >= s.pa && (!size || size[2 * i] > 0.f);
        float bs = -INFINITY;
        int bj = 0;
        for (int j = 0; row_ok && j < s.nb; ++j) {
            const bool ok = j >= s.pb && (!size || size[2 * j + 1] > 0.f);
            float sc = -INFINITY;
            if (ok) {
                const float *a = m + (long)(2 * i) * ck, *b = m + (long)(2 * j + 1) * ck;
                float dot = 0.f;
                for (int k = 0; k < ck; ++k) dot += a[k] * b[k];
                sc = pair_score(dot, norm[2 * i], norm[2 * j + 1], true);
            }
            if (better_match(sc, j, bs, bj)) bs = sc, bj = j;
        }
        best[i] = row_ok ? bs : -INFINITY;
        bidx[i] = row_ok ? bj : 0;
    }
}

// Plan + output of one image; rows = output row stride; returns the valid row count.
int merge_image(const float* x, const float* m, const float* size, int n, int c, int ck, int pf, int r, float thr,
                bool threshold_mode, int rows, float* x_out, float* size_out) {
    Split s = split(n, pf);
    std::vector<float> best(s.na);
    std::vector<int> bidx(s.na), merged(s.na), out_src(n, -1), boff(s.nb + 1), blist(s.na + 1);
    std::vector<unsigned char> valid(n);
    for (int t = 0; t < n; ++t) valid[t] = size[t] > 0.f;
    match_image(m, threshold_mode ? size : nullptr, n, ck, pf, best.data(), bidx.data());
    MergePlanArgs a{n, pf, best.data(), bidx.data(), threshold_mode ? valid.data() : nullptr,
                    threshold_mode ? -1 : r, thr};
    plan_merged(a, merged.data(), 0, 1);
    const int count = plan_count(a, merged.data());
    plan_slots(a, merged.data(), out_src.data(), boff.data(), 0, 1);
    plan_lists(a, merged.data(), boff.data(), blist.data(), 0, 1);
    for (int q = 0; q < rows; ++q) {
        for (int ch = 0; ch < c; ++ch)
            x_out[(long)q * c + ch] =
                merge_value(x, size, n, c, ch, out_src[q], boff.data(), blist.data(), threshold_mode);
        size_out[q] = merge_size(size, n, out_src[q], boff.data(), blist.data());
    }
    return count;
}

}  // namespace

EDGETOK_HOST_API int edgetok_host_max_merges(int n, int protect_first) { return max_merges(n, protect_first); }
EDGETOK_HOST_API int edgetok_host_match_chunk(int ck) { return match_chunk(ck); }
EDGETOK_HOST_API size_t edgetok_host_match_smem(int ck) { return match_smem(ck); }
EDGETOK_HOST_API size_t edgetok_host_merge_smem(int n) { return merge_smem(n); }
EDGETOK_HOST_API size_t edgetok_host_drop_smem(int n) { return drop_smem(n); }
EDGETOK_HOST_API size_t edgetok_host_match_workspace(int64_t b, int64_t n) { return match_workspace(b, n); }
EDGETOK_HOST_API void edgetok_host_output_grid(int b, int rows, int c, unsigned* out) {
    Grid g = output_grid(b, rows, c);
    out[0] = g.x, out[1] = g.y, out[2] = g.z;
}
EDGETOK_HOST_API int edgetok_host_supported(int n, int ck, int is_drop) {
    return unsupported_reason(n, ck, !is_drop, is_drop) == nullptr;
}

// Best match of every A row (the match phase alone): best[B, na], bidx[B, na].
EDGETOK_HOST_API void edgetok_host_match(const float* metric, const float* size, int b, int n, int ck, int pf,
                                         float* best, int* bidx) {
    const int na = (n + 1) / 2;
    for (int i = 0; i < b; ++i)
        match_image(metric + (long)i * n * ck, size ? size + (long)i * n : nullptr, n, ck, pf, best + (long)i * na,
                    bidx + (long)i * na);
}

EDGETOK_HOST_API void edgetok_host_token_merge(const float* x, const float* metric, const float* size, float* x_out,
                                               float* size_out, int b, int n, int c, int ck, int r, int pf) {
    if (r == 0) {  // as the C API: the reference returns its input unchanged
        std::copy(x, x + (long)b * n * c, x_out);
        std::copy(size, size + (long)b * n, size_out);
        return;
    }
    for (int i = 0; i < b; ++i)
        merge_image(x + (long)i * n * c, metric + (long)i * n * ck, size + (long)i * n, n, c, ck, pf, r, 0.f, false,
                    n - r, x_out + (long)i * (n - r) * c, size_out + (long)i * (n - r));
}

// Outputs with row stride n (capacity); count[B]; returns the batch max count M.
EDGETOK_HOST_API int edgetok_host_threshold_merge(const float* x, const float* metric, const float* size,
                                                  float* x_out, float* size_out, int64_t* count, int b, int n, int c,
                                                  int ck, float thr, int pf) {
    int m = 0;
    for (int i = 0; i < b; ++i) {
        count[i] = merge_image(x + (long)i * n * c, metric + (long)i * n * ck, size + (long)i * n, n, c, ck, pf, 0,
                               thr, true, n, x_out + (long)i * n * c, size_out + (long)i * n);
        if (count[i] > m) m = (int)count[i];
    }
    return m;
}

EDGETOK_HOST_API void edgetok_host_token_drop(const float* x, const float* score, float* x_out, int64_t* idx, int b,
                                              int n, int c, int keep, int pf, int fuse) {
    std::vector<int> kept(n), out_src(n);
    const int rows = keep + fuse;
    for (int i = 0; i < b; ++i) {
        const float* xb = x + (long)i * n * c;
        const float* sb = score + (long)i * n;
        drop_kept(sb, n, keep, pf, kept.data(), 0, 1);
        drop_slots(kept.data(), n, out_src.data(), 0, 1);
        for (int q = 0; q < rows; ++q)
            for (int ch = 0; ch < c; ++ch)
                x_out[((long)i * rows + q) * c + ch] =
                    q < keep ? xb[(long)out_src[q] * c + ch] : drop_fused_value(xb, sb, kept.data(), n, c, ch);
        for (int q = 0; q < keep; ++q) idx[(long)i * keep + q] = out_src[q];
    }
}
