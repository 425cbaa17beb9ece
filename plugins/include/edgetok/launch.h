// Launch configuration, workspace layout and block bodies of the edgetok kernels, shared by
// the CUDA launchers (kernels.cu), the TensorRT plugins (through the C API) and the CPU
// library (host_reference.cpp), which runs the same grids block by block.
//
// Each op is a fixed sequence of launches:
//   token_merge      match (best B of every A row) -> plan (one block per image) -> output
//   threshold_merge  memset(max_count) -> match -> plan (also the counts) -> output
//   token_drop       plan (one block per image) -> output
// The output kernels tile (channels x rows x batch) and only gather: every plan is computed
// once per image, in the workspace.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "plan.h"
#include "rowops.h"

namespace edgetok {

constexpr int kThreads = 256;         // threads of every kernel block
constexpr int kMatchWarps = 8;        // A rows per match block (one warp each)
constexpr int kTileChannels = 128;    // channels per output block
constexpr int kTileRows = 16;         // output rows per output block
constexpr size_t kSmemBudget = 48 * 1024;  // default dynamic shared memory limit, no opt-in needed
constexpr int kMaxChunk = 64;         // B columns staged per match iteration
// Grid limits: output row tiles are grid.y, the batch is grid.y (match) or grid.z (output).
constexpr int64_t kMaxTokens = 65535LL * kTileRows;
constexpr int64_t kMaxBatch = 65535;

ET_HD size_t align_up(size_t v, size_t a = 256) { return (v + a - 1) / a * a; }

// Match kernel staging. Rows of the staged A block and of the transposed B chunk have odd
// strides: a warp's threads storing consecutive k (and the norm loop reading A rows) then
// hit distinct banks. An even stride such as 64 put all 32 stores of a warp in one bank.
ET_HD int match_lda(int ck) { return ck | 1; }
ET_HD int match_ldb(int chunk) { return chunk | 1; }
// B columns the match kernel stages per iteration for metric width ck (0: ck too wide).
inline int match_chunk(int ck) {
    long budget = (long)(kSmemBudget / sizeof(float)) - (long)kMatchWarps * (match_lda(ck) + 1) - ck;
    long chunk = budget / (ck + 1);  // a column is ck values (stride <= chunk + 1) and one norm
    if (chunk < 1) return 0;
    return chunk > kMaxChunk ? kMaxChunk : (int)chunk;
}
inline size_t match_smem(int ck) {
    const int chunk = match_chunk(ck);
    return sizeof(float) *
           ((size_t)kMatchWarps * (match_lda(ck) + 1) + (size_t)ck * match_ldb(chunk) + (size_t)chunk);
}

// A plan block's scratch lives in shared memory when it fits, else in the workspace (one slice
// per image): no token count is too large, the large ones only read L2 instead of shared memory.
inline bool plan_in_smem(int L) { return plan_scratch_bytes(L, kThreads) <= kSmemBudget; }
inline size_t plan_smem(int L) { return plan_in_smem(L) ? plan_scratch_bytes(L, kThreads) : 0; }

// Workspace of one op call: byte offsets of its regions (each 256-byte aligned).
struct WsLayout {
    size_t best, bidx;               // match: best score [B, na] f32, best column [B, na] i32
    size_t src, boff, blist;         // merge plans [B, n], [B, nb + 1], [B, na] i32
    size_t dropped;                  // drop plans: dropped tokens in rank order [B, n] i32
    size_t scratch, scratch_stride;  // plan scratch per image when not in shared memory (stride 0: shared)
    size_t total;
};

struct WsBuilder {
    size_t used = 0;
    size_t take(size_t bytes) {
        size_t at = used;
        used += align_up(bytes);
        return at;
    }
};

inline WsLayout merge_layout(int64_t b, int64_t n) {
    const int64_t na = (n + 1) / 2, nb = n / 2;
    WsLayout w{};
    WsBuilder ws;
    w.best = ws.take(sizeof(float) * b * na);
    w.bidx = ws.take(sizeof(int) * b * na);
    w.src = ws.take(sizeof(int) * b * n);
    w.boff = ws.take(sizeof(int) * b * (nb + 1));
    w.blist = ws.take(sizeof(int) * b * na);
    w.scratch_stride = plan_in_smem((int)na) ? 0 : align_up(plan_scratch_bytes((int)na, kThreads));
    w.scratch = ws.take(w.scratch_stride * b);
    w.total = ws.used;
    return w;
}

inline WsLayout drop_layout(int64_t b, int64_t n) {
    WsLayout w{};
    WsBuilder ws;
    w.dropped = ws.take(sizeof(int) * b * n);
    w.scratch_stride = plan_in_smem((int)n) ? 0 : align_up(plan_scratch_bytes((int)n, kThreads));
    w.scratch = ws.take(w.scratch_stride * b);
    w.total = ws.used;
    return w;
}

struct Grid {
    unsigned x, y, z;
};
inline unsigned ceil_div(long a, long b) { return (unsigned)((a + b - 1) / b); }
inline Grid match_grid(int b, int n) { return Grid{ceil_div((n + 1) / 2, kMatchWarps), (unsigned)b, 1}; }
inline Grid plan_grid(int b) { return Grid{(unsigned)b, 1, 1}; }
// Output blocks tile (channels, rows, batch); rows = output rows of the op (an upper bound
// for threshold_merge: blocks past the device-side row count return at once).
inline Grid output_grid(int b, int rows, int c) {
    int tc = c < kTileChannels ? c : kTileChannels;
    return Grid{ceil_div(c, tc > 0 ? tc : 1), ceil_div(rows > 0 ? rows : 1, kTileRows), (unsigned)b};
}

// Output block (bx, by): rows [q0, q1) x channels [c0, c0 + tcn).
struct Tile {
    int q0, q1, c0, tcn;
};
ET_HD Tile output_tile(unsigned bx, unsigned by, int rows, int C) {
    const int tc = C < kTileChannels ? C : kTileChannels;
    const int q0 = (int)by * kTileRows, c0 = (int)bx * tc;
    return Tile{q0, imin(q0 + kTileRows, rows), c0, imin(tc, C - c0)};
}

// Why an op cannot run on the kernels (null: it can). Python falls back to the reference.
inline const char* unsupported_reason(int64_t n, int64_t ck, bool needs_match) {
    if (n > kMaxTokens) return "more tokens than the output grid covers (1,048,560)";
    if (needs_match && match_chunk((int)ck) == 0) return "metric width too large for the match kernel";
    return nullptr;
}

// ---------------------------------------------------------------------------
// Block bodies: each kernel is one call of these with DeviceBlock and blockIdx; the CPU
// library calls them for every block of the same grid with HostBlock.
// ---------------------------------------------------------------------------

ET_HD MergePlan merge_plan_at(char* ws, const WsLayout& w, int b, int n) {
    const long na = (n + 1) / 2, nb = n / 2;
    return MergePlan{reinterpret_cast<int*>(ws + w.src) + b * (long)n, reinterpret_cast<int*>(ws + w.boff) + b * (nb + 1),
                     reinterpret_cast<int*>(ws + w.blist) + b * na};
}
ET_HD PlanScratch scratch_at(char* ws, const WsLayout& w, int b, void* smem, int L) {
    return carve_scratch(w.scratch_stride ? ws + w.scratch + b * w.scratch_stride : smem, L, kThreads);
}

template <class Block>
ET_HD void token_merge_plan_block(Block& blk, int b, char* ws, const WsLayout& w, void* smem, int n, int pf, int r) {
    const long na = (n + 1) / 2;
    token_merge_plan(blk, reinterpret_cast<const float*>(ws + w.best) + b * na,
                     reinterpret_cast<const int*>(ws + w.bidx) + b * na, n, pf, r, merge_plan_at(ws, w, b, n),
                     scratch_at(ws, w, b, smem, (int)na));
}

template <class Block, class T>
ET_HD void threshold_merge_plan_block(Block& blk, int b, const T* size, char* ws, const WsLayout& w, void* smem,
                                      int n, int pf, float thr, int64_t* count, int64_t* max_count) {
    const long na = (n + 1) / 2;
    threshold_merge_plan(blk, reinterpret_cast<const float*>(ws + w.best) + b * na,
                         reinterpret_cast<const int*>(ws + w.bidx) + b * na, size + b * (long)n, n, pf, thr,
                         merge_plan_at(ws, w, b, n), scratch_at(ws, w, b, smem, (int)na), count + b, max_count);
}

// rows: output row stride (N - r, or threshold_merge's batch max M); count: valid rows per
// image (threshold_merge; null: all rows). Rows past the count are zero with size 0.
template <class Block, class T>
ET_HD void merge_output_block(Block& blk, unsigned bx, unsigned by, int b, const T* x, const T* size, char* ws,
                              const WsLayout& w, int n, int C, int rows, const int64_t* count, T* x_out,
                              T* size_out) {
    const Tile tl = output_tile(bx, by, rows, C);
    if (tl.q0 >= rows) return;  // uniform per block
    const MergePlan plan = merge_plan_at(ws, w, b, n);
    const int valid = count ? (int)count[b] : rows;
    const bool clamp = count != nullptr;  // threshold_merge divides by max(size, eps), as its reference
    const T* xb = x + (long)b * n * C;
    const T* sb = size + (long)b * n;
    T* xo = x_out + (long)b * rows * C;
    T* so = size_out + (long)b * rows;
    blk.run([&](int tid, int nt) {
        for (int e = tid; e < (tl.q1 - tl.q0) * tl.tcn; e += nt) {
            const int q = tl.q0 + e / tl.tcn, c = tl.c0 + e % tl.tcn;
            const float v = q < valid ? merge_value(xb, sb, n, C, c, plan.src[q], plan.boff, plan.blist, clamp) : 0.f;
            xo[(long)q * C + c] = Num<T>::store(v);
        }
        if (bx == 0)
            for (int q = tl.q0 + tid; q < tl.q1; q += nt)
                so[q] = Num<T>::store(q < valid ? merge_size(sb, n, plan.src[q], plan.boff, plan.blist) : 0.f);
    });
}

template <class Block, class T>
ET_HD void token_drop_plan_block(Block& blk, int b, const T* score, int64_t* idx, char* ws, const WsLayout& w,
                                 void* smem, int n, int keep, int pf) {
    token_drop_plan(blk, score + b * (long)n, n, keep, pf, idx + b * (long)keep,
                    reinterpret_cast<int*>(ws + w.dropped) + b * (long)n, scratch_at(ws, w, b, smem, n));
}

template <class Block, class T>
ET_HD void drop_output_block(Block& blk, unsigned bx, unsigned by, int b, const T* x, const T* score,
                             const int64_t* idx, char* ws, const WsLayout& w, int n, int C, int keep, int fuse,
                             T* x_out) {
    const int rows = keep + fuse;
    const Tile tl = output_tile(bx, by, rows, C);
    if (tl.q0 >= rows) return;  // uniform per block
    const T* xb = x + (long)b * n * C;
    const int64_t* ib = idx + (long)b * keep;
    const int* dropped = reinterpret_cast<const int*>(ws + w.dropped) + b * (long)n;
    T* xo = x_out + (long)b * rows * C;
    blk.run([&](int tid, int nt) {
        for (int e = tid; e < (tl.q1 - tl.q0) * tl.tcn; e += nt) {
            const int q = tl.q0 + e / tl.tcn, c = tl.c0 + e % tl.tcn;
            const float v = q < keep ? Num<T>::load(xb[ib[q] * C + c])
                                     : drop_fused_value(xb, score + (long)b * n, dropped, n - keep, C, c);
            xo[(long)q * C + c] = Num<T>::store(v);
        }
    });
}

}  // namespace edgetok
