// CPU build of the kernels' logic, for tests without a GPU.
//
// Each op runs the launches its CUDA launcher makes (launch.h), block by block over the same
// grids, calling the same block bodies with a HostBlock: the kernel's threads run one after
// the other in each phase (kThreads of them, forwards or in reverse), so the tests exercise
// the very partition of work the kernels use. Float32 only. tests/test_plugins.py loads this
// library with ctypes and compares it with the torch references in edgetok/reduce.
//
// The match phase mirrors match_kernel (clamped norms, sequential dot products, first-index
// argmax) without its warp shuffles. Every call records, per image, how many plans were begun
// and how many plan iterations ran (edgetok_host_plan_stats): the plan-once test reads them.
#include <stdint.h>

#include <algorithm>
#include <vector>

#include "edgetok/launch.h"
#include "edgetok/plan.h"
#include "edgetok/rowops.h"

#define EDGETOK_HOST_API extern "C" __attribute__((visibility("default")))

using namespace edgetok;

namespace {

bool g_reverse = false;  // run each phase's threads in reverse order (exposes intra-phase races)

struct HostBlock {
    long ticks = 0, phases = 0, plans = 0;
    template <class F>
    void run(F&& f) {
        for (int k = 0; k < kThreads; ++k) f(g_reverse ? kThreads - 1 - k : k, kThreads);
        ++phases;
    }
    void tick(long k) { ticks += k; }
    void begin_plan() { ++plans; }
};

// Per image, over every block of every launch of the last op call.
struct ImageStats {
    int64_t plans = 0, plan_ticks = 0, plan_phases = 0, blocks = 0;
};
std::vector<ImageStats> g_stats;

void record(int b, const HostBlock& blk) {
    ImageStats& s = g_stats[b];
    s.plans += blk.plans, s.plan_ticks += blk.ticks, s.plan_phases += blk.plans ? blk.phases : 0, s.blocks += 1;
}

// Workspace of one call and shared memory of the plan blocks, filled with garbage as neither is
// initialised on the GPU (TensorRT does not clear its workspace).
constexpr uint64_t kGarbage = 0xa5a5a5a5a5a5a5a5ull;
struct Buffers {
    std::vector<uint64_t> ws, smem;
    Buffers(size_t ws_bytes, size_t smem_bytes) : ws(ws_bytes / 8 + 1, kGarbage), smem(smem_bytes / 8 + 1) {}
    char* workspace() { return reinterpret_cast<char*>(ws.data()); }
    void* fresh_smem() {
        std::fill(smem.begin(), smem.end(), kGarbage);
        return smem.data();
    }
};

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

void match_batch(const float* metric, const float* size, int b, int n, int ck, int pf, float* best, int* bidx) {
    const int na = (n + 1) / 2;
    for (int i = 0; i < b; ++i)
        match_image(metric + (long)i * n * ck, size ? size + (long)i * n : nullptr, n, ck, pf, best + (long)i * na,
                    bidx + (long)i * na);
}

// The match launch: best / bidx into the workspace, where the plan kernel reads them.
void match_all(char* ws, const WsLayout& w, const float* metric, const float* size, int b, int n, int ck, int pf) {
    match_batch(metric, size, b, n, ck, pf, reinterpret_cast<float*>(ws + w.best), reinterpret_cast<int*>(ws + w.bidx));
}

// The output kernel's grid, block by block.
template <class Body>
void each_output_block(int b, int rows, int c, Body body) {
    const Grid g = output_grid(b, rows, c);
    for (unsigned z = 0; z < g.z; ++z)
        for (unsigned y = 0; y < g.y; ++y)
            for (unsigned x = 0; x < g.x; ++x) {
                HostBlock blk;
                body(blk, x, y, (int)z);
                record((int)z, blk);
            }
}

// The plan kernel's grid: one block per image.
template <class Body>
void each_plan_block(int b, Body body) {
    const Grid g = plan_grid(b);
    for (unsigned x = 0; x < g.x; ++x) {
        HostBlock blk;
        body(blk, (int)x);
        record((int)x, blk);
    }
}

}  // namespace

EDGETOK_HOST_API int edgetok_host_threads(void) { return kThreads; }
EDGETOK_HOST_API void edgetok_host_set_reverse(int reverse) { g_reverse = reverse != 0; }
EDGETOK_HOST_API int edgetok_host_max_merges(int n, int protect_first) { return max_merges(n, protect_first); }
EDGETOK_HOST_API int edgetok_host_match_chunk(int ck) { return match_chunk(ck); }
EDGETOK_HOST_API size_t edgetok_host_match_smem(int ck) { return match_smem(ck); }
EDGETOK_HOST_API size_t edgetok_host_plan_smem(int elements) { return plan_smem(elements); }
EDGETOK_HOST_API size_t edgetok_host_plan_scratch(int elements) { return plan_scratch_bytes(elements, kThreads); }
EDGETOK_HOST_API size_t edgetok_host_merge_workspace(int64_t b, int64_t n) { return merge_layout(b, n).total; }
EDGETOK_HOST_API size_t edgetok_host_drop_workspace(int64_t b, int64_t n) { return drop_layout(b, n).total; }
EDGETOK_HOST_API void edgetok_host_output_grid(int b, int rows, int c, unsigned* out) {
    Grid g = output_grid(b, rows, c);
    out[0] = g.x, out[1] = g.y, out[2] = g.z;
}
EDGETOK_HOST_API int edgetok_host_supported(int64_t n, int64_t ck, int is_drop) {
    return unsupported_reason(n, ck, !is_drop) == nullptr;
}

// Stats of the last op call, per image: plans begun, plan iterations, plan phases, blocks run.
EDGETOK_HOST_API int edgetok_host_plan_stats(int64_t* out, int capacity) {
    const int b = (int)g_stats.size();
    for (int i = 0; i < b && i < capacity; ++i) {
        out[4 * i] = g_stats[i].plans, out[4 * i + 1] = g_stats[i].plan_ticks;
        out[4 * i + 2] = g_stats[i].plan_phases, out[4 * i + 3] = g_stats[i].blocks;
    }
    return b;
}

// Best match of every A row (the match phase alone): best[B, na], bidx[B, na].
EDGETOK_HOST_API void edgetok_host_match(const float* metric, const float* size, int b, int n, int ck, int pf,
                                         float* best, int* bidx) {
    match_batch(metric, size, b, n, ck, pf, best, bidx);
}

EDGETOK_HOST_API void edgetok_host_token_merge(const float* x, const float* metric, const float* size, float* x_out,
                                               float* size_out, int b, int n, int c, int ck, int r, int pf) {
    g_stats.assign(b, ImageStats{});
    if (r == 0) {  // as the C API: the reference returns its input unchanged
        std::copy(x, x + (long)b * n * c, x_out);
        std::copy(size, size + (long)b * n, size_out);
        return;
    }
    const WsLayout w = merge_layout(b, n);
    Buffers buf(w.total, plan_smem((n + 1) / 2));
    char* ws = buf.workspace();
    match_all(ws, w, metric, nullptr, b, n, ck, pf);
    each_plan_block(b, [&](HostBlock& blk, int i) {
        token_merge_plan_block(blk, i, ws, w, buf.fresh_smem(), n, pf, r);
    });
    each_output_block(b, n - r, c, [&](HostBlock& blk, unsigned bx, unsigned by, int i) {
        merge_output_block(blk, bx, by, i, x, size, ws, w, n, c, n - r, (const int64_t*)nullptr, x_out, size_out);
    });
}

// Outputs [B, M, C] / [B, M, 1] with M = the batch max count (returned); count[B].
EDGETOK_HOST_API int edgetok_host_threshold_merge(const float* x, const float* metric, const float* size,
                                                  float* x_out, float* size_out, int64_t* count, int b, int n, int c,
                                                  int ck, float thr, int pf) {
    g_stats.assign(b, ImageStats{});
    const WsLayout w = merge_layout(b, n);
    Buffers buf(w.total, plan_smem((n + 1) / 2));
    char* ws = buf.workspace();
    int64_t max_count = 0;
    match_all(ws, w, metric, size, b, n, ck, pf);
    each_plan_block(b, [&](HostBlock& blk, int i) {
        threshold_merge_plan_block(blk, i, size, ws, w, buf.fresh_smem(), n, pf, thr, count, &max_count);
    });
    const int m = (int)max_count;
    each_output_block(b, m, c, [&](HostBlock& blk, unsigned bx, unsigned by, int i) {
        merge_output_block(blk, bx, by, i, x, size, ws, w, n, c, m, count, x_out, size_out);
    });
    return m;
}

EDGETOK_HOST_API void edgetok_host_token_drop(const float* x, const float* score, float* x_out, int64_t* idx, int b,
                                              int n, int c, int keep, int pf, int fuse) {
    g_stats.assign(b, ImageStats{});
    const WsLayout w = drop_layout(b, n);
    Buffers buf(w.total, plan_smem(n));
    char* ws = buf.workspace();
    each_plan_block(b, [&](HostBlock& blk, int i) {
        token_drop_plan_block(blk, i, score, idx, ws, w, buf.fresh_smem(), n, keep, pf);
    });
    each_output_block(b, keep + fuse, c, [&](HostBlock& blk, unsigned bx, unsigned by, int i) {
        drop_output_block(blk, bx, by, i, x, score, idx, ws, w, n, c, keep, fuse, x_out);
    });
}
