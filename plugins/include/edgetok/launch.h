// Launch configuration and workspace sizes of the edgetok kernels: plain host C++,
// shared by the CUDA launchers, the TensorRT plugins and the CPU tests.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "rowops.h"

namespace edgetok {

constexpr int kThreads = 256;         // threads of every kernel block
constexpr int kMatchWarps = 8;        // A rows per match block (one warp each)
constexpr int kTileChannels = 128;    // channels per output block
constexpr int kTileRows = 16;         // output rows per output block
constexpr size_t kSmemBudget = 48 * 1024;  // default dynamic shared memory limit, no opt-in needed
constexpr int kMaxChunk = 64;         // B columns staged per match iteration

inline size_t align_up(size_t v, size_t a = 256) { return (v + a - 1) / a * a; }

// B columns the match kernel stages per iteration for metric width ck (0: ck too wide).
inline int match_chunk(int ck) {
    long budget = (long)(kSmemBudget / sizeof(float)) - (long)kMatchWarps * (ck + 1);
    long chunk = budget / (ck + 1);  // ck values + one norm per staged column
    if (chunk < 1) return 0;
    return chunk > kMaxChunk ? kMaxChunk : (int)chunk;
}
inline size_t match_smem(int ck) {
    return sizeof(float) * ((size_t)kMatchWarps * (ck + 1) + (size_t)match_chunk(ck) * (ck + 1));
}

// Shared memory of the merge output kernel: merged[na], out_src[n], boff[nb+1], blist[na],
// best[na] (float), bidx[na], valid[n] (bytes).
inline size_t merge_smem(int n) {
    Split s = split(n, 0);
    return sizeof(int) * ((size_t)s.na * 4 + n + s.nb + 1) + align_up((size_t)n, sizeof(int));
}
// Drop kernel: score[n] (float), kept[n], out_src[n].
inline size_t drop_smem(int n) { return sizeof(float) * (size_t)n + 2 * sizeof(int) * (size_t)n; }

// Workspace (device scratch) of each op: best score + best index per A row.
inline size_t match_workspace(int64_t b, int64_t n) {
    int64_t na = (n + 1) / 2;
    return align_up(sizeof(float) * b * na) + align_up(sizeof(int) * b * na);
}

struct Grid {
    unsigned x, y, z;
};
inline unsigned ceil_div(long a, long b) { return (unsigned)((a + b - 1) / b); }
inline Grid match_grid(int b, int n) { return Grid{ceil_div((n + 1) / 2, kMatchWarps), (unsigned)b, 1}; }
// Output blocks tile (channels, rows, batch); rows = output rows of the op.
inline Grid output_grid(int b, int rows, int c) {
    int tc = c < kTileChannels ? c : kTileChannels;
    return Grid{ceil_div(c, tc > 0 ? tc : 1), ceil_div(rows > 0 ? rows : 1, kTileRows), (unsigned)b};
}
ET_HD int tile_channels(int c) { return c < kTileChannels ? c : kTileChannels; }

// Why an op cannot run on the kernels (null: it can). Python falls back to the reference.
inline const char* unsupported_reason(int n, int ck, bool needs_match, bool is_drop) {
    if (needs_match && match_chunk(ck) == 0) return "metric width too large for the match kernel";
    if (needs_match && merge_smem(n) > kSmemBudget) return "too many tokens for the merge kernel";
    if (is_drop && drop_smem(n) > kSmemBudget) return "too many tokens for the drop kernel";
    return nullptr;
}

}  // namespace edgetok
