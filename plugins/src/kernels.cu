// edgetok fused reduction kernels and their C API.
//
// token_merge      2 launches: match (A->B best match, row-parallel), output (plan + gather +
//                  size-weighted merge, tiled over channels x rows x batch).
// token_drop       1 launch: output (rank + ordered gather + fused token).
// threshold_merge  memset + 3 launches: match, count (per-image count, batch max), output
//                  (written with the row stride M = batch max read on the device).
// Each output block recomputes its image's small plan (O(N^2 / threads) compares in shared
// memory) instead of a separate launch: at batch 1 a launch costs more than the compares.
// The per-row logic lives in rowops.h, shared with the CPU test library.
#include <cuda_runtime.h>

#include <string>

#include "edgetok/kernels.h"
#include "edgetok/launch.h"
#include "edgetok/rowops.h"

namespace edgetok {
namespace {

thread_local std::string g_error;

int fail(int code, const std::string& msg) {
    g_error = msg;
    return code;
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    match_kernel(const T* __restrict__ metric, const T* __restrict__ size, int n, int ck, int pf, int chunk,
                 float* __restrict__ best, int* __restrict__ bidx) {
    extern __shared__ float smem[];
    const Split s = split(n, pf);
    const int b = blockIdx.y, row0 = blockIdx.x * kMatchWarps;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    float* sa = smem;                    // [kMatchWarps][ck] A rows
    float* norm_a = sa + kMatchWarps * ck;  // [kMatchWarps]
    float* sb = norm_a + kMatchWarps;    // [ck][chunk] staged B columns, transposed
    float* norm_b = sb + ck * chunk;     // [chunk]
    const T* m = metric + (long)b * n * ck;
    const T* sz = size ? size + (long)b * n : nullptr;
    const int rows = min(kMatchWarps, s.na - row0);

    for (int e = tid; e < rows * ck; e += blockDim.x) {
        int w = e / ck, k = e % ck;
        sa[w * ck + k] = Num<T>::load(m[(long)(2 * (row0 + w)) * ck + k]);
    }
    __syncthreads();
    if (tid < rows) norm_a[tid] = clamped_norm(sa + tid * ck, ck, 1);
    const int i = row0 + warp;
    const bool row_ok = warp < rows && i >= s.pa && (!sz || Num<T>::load(sz[2 * i]) > 0.f);
    float bs = -INFINITY;
    int bj = 0;
    for (int j0 = 0; j0 < s.nb; j0 += chunk) {
        const int cnt = min(chunk, s.nb - j0);
        __syncthreads();  // the previous chunk is consumed
        for (int e = tid; e < cnt * ck; e += blockDim.x) {
            int jj = e / ck, k = e % ck;
            sb[k * chunk + jj] = Num<T>::load(m[(long)(2 * (j0 + jj) + 1) * ck + k]);
        }
        __syncthreads();
        if (tid < cnt) norm_b[tid] = clamped_norm(sb + tid, ck, chunk);
        __syncthreads();
        if (!row_ok) continue;
        for (int jj = lane; jj < cnt; jj += 32) {
            const int j = j0 + jj;
            const bool ok = j >= s.pb && (!sz || Num<T>::load(sz[2 * j + 1]) > 0.f);
            float sc = -INFINITY;
            if (ok) {
                float dot = 0.f;
                for (int k = 0; k < ck; ++k) dot += sa[warp * ck + k] * sb[k * chunk + jj];
                sc = pair_score(dot, norm_a[warp], norm_b[jj], true);
            }
            if (better_match(sc, j, bs, bj)) bs = sc, bj = j;
        }
    }
    for (int off = 16; off > 0; off >>= 1) {
        float os = __shfl_down_sync(0xffffffffu, bs, off);
        int oj = __shfl_down_sync(0xffffffffu, bj, off);
        if (better_match(os, oj, bs, bj)) bs = os, bj = oj;
    }
    if (warp < rows && lane == 0) {
        best[(long)b * s.na + i] = row_ok ? bs : -INFINITY;
        bidx[(long)b * s.na + i] = row_ok ? bj : 0;
    }
}

// Shared-memory plan of one image, laid out as launch.h's merge_smem counts it.
struct MergeSmem {
    int *merged, *out_src, *boff, *blist, *bidx;
    float* best;
    unsigned char* valid;
    __device__ MergeSmem(void* base, int n) {
        Split s = split(n, 0);
        int* p = static_cast<int*>(base);
        merged = p, p += s.na;
        out_src = p, p += n;
        boff = p, p += s.nb + 1;
        blist = p, p += s.na;
        bidx = p, p += s.na;
        best = reinterpret_cast<float*>(p), p += s.na;
        valid = reinterpret_cast<unsigned char*>(p);
    }
};

template <class T>
__device__ void load_merge_inputs(const MergeSmem& sm, const T* sz, const float* best, const int* bidx, int n,
                                  bool threshold_mode) {
    const int na = (n + 1) / 2;
    for (int i = threadIdx.x; i < na; i += blockDim.x) sm.best[i] = best[i], sm.bidx[i] = bidx[i];
    for (int t = threadIdx.x; t < n; t += blockDim.x) {
        sm.out_src[t] = -1;
        if (threshold_mode) sm.valid[t] = Num<T>::load(sz[t]) > 0.f;
    }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    count_kernel(const T* __restrict__ size, const float* __restrict__ best, const int* __restrict__ bidx, int n,
                 int pf, float threshold, int64_t* __restrict__ count, int64_t* __restrict__ max_count) {
    extern __shared__ int smem_i[];
    MergeSmem sm(smem_i, n);
    const int b = blockIdx.x, na = (n + 1) / 2;
    load_merge_inputs(sm, size + (long)b * n, best + (long)b * na, bidx + (long)b * na, n, true);
    __syncthreads();
    MergePlanArgs a{n, pf, sm.best, sm.bidx, sm.valid, -1, threshold};
    plan_merged(a, sm.merged, threadIdx.x, blockDim.x);
    __syncthreads();
    if (threadIdx.x == 0) {
        const int c = plan_count(a, sm.merged);
        count[b] = c;
        atomicMax(reinterpret_cast<unsigned long long*>(max_count), (unsigned long long)c);
    }
}

// rows_dev != null: threshold mode, the row stride is the batch max read from the device.
template <class T>
__global__ void __launch_bounds__(kThreads)
    merge_output_kernel(const T* __restrict__ x, const T* __restrict__ size, const float* __restrict__ best,
                        const int* __restrict__ bidx, int n, int C, int pf, int r, float threshold,
                        const int64_t* __restrict__ rows_dev, T* __restrict__ x_out, T* __restrict__ size_out) {
    extern __shared__ int smem_i[];
    const bool thr = rows_dev != nullptr;
    const int rows = thr ? (int)*rows_dev : n - r;
    const int q0 = blockIdx.y * kTileRows;
    if (q0 >= rows) return;  // uniform per block
    MergeSmem sm(smem_i, n);
    const int b = blockIdx.z, na = (n + 1) / 2;
    const T* xb = x + (long)b * n * C;
    const T* sb = size + (long)b * n;
    load_merge_inputs(sm, sb, best + (long)b * na, bidx + (long)b * na, n, thr);
    __syncthreads();
    MergePlanArgs a{n, pf, sm.best, sm.bidx, thr ? sm.valid : nullptr, thr ? -1 : r, threshold};
    plan_merged(a, sm.merged, threadIdx.x, blockDim.x);
    __syncthreads();
    plan_slots(a, sm.merged, sm.out_src, sm.boff, threadIdx.x, blockDim.x);
    __syncthreads();
    plan_lists(a, sm.merged, sm.boff, sm.blist, threadIdx.x, blockDim.x);
    __syncthreads();
    const int tc = tile_channels(C), c0 = blockIdx.x * tc, tcn = min(tc, C - c0);
    const int q1 = min(q0 + kTileRows, rows);
    for (int e = threadIdx.x; e < (q1 - q0) * tcn; e += blockDim.x) {
        const int q = q0 + e / tcn, c = c0 + e % tcn;
        const float v = merge_value(xb, sb, n, C, c, sm.out_src[q], sm.boff, sm.blist, thr);
        x_out[((long)b * rows + q) * C + c] = Num<T>::store(v);
    }
    if (blockIdx.x == 0)
        for (int q = q0 + threadIdx.x; q < q1; q += blockDim.x)
            size_out[(long)b * rows + q] = Num<T>::store(merge_size(sb, n, sm.out_src[q], sm.boff, sm.blist));
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    drop_kernel(const T* __restrict__ x, const T* __restrict__ score, T* __restrict__ x_out,
                int64_t* __restrict__ idx, int n, int C, int keep, int pf, int fuse) {
    extern __shared__ int smem_i[];
    const int rows = keep + fuse, q0 = blockIdx.y * kTileRows;
    if (q0 >= rows) return;  // uniform per block
    const int b = blockIdx.z;
    float* sc = reinterpret_cast<float*>(smem_i);
    int* kept = smem_i + n;
    int* out_src = kept + n;
    const T* xb = x + (long)b * n * C;
    for (int t = threadIdx.x; t < n; t += blockDim.x) sc[t] = Num<T>::load(score[(long)b * n + t]);
    __syncthreads();
    drop_kept(sc, n, keep, pf, kept, threadIdx.x, blockDim.x);
    __syncthreads();
    drop_slots(kept, n, out_src, threadIdx.x, blockDim.x);
    __syncthreads();
    const int tc = tile_channels(C), c0 = blockIdx.x * tc, tcn = min(tc, C - c0);
    const int q1 = min(q0 + kTileRows, rows);
    for (int e = threadIdx.x; e < (q1 - q0) * tcn; e += blockDim.x) {
        const int q = q0 + e / tcn, c = c0 + e % tcn;
        const float v = q < keep ? Num<T>::load(xb[(long)out_src[q] * C + c]) : drop_fused_value(xb, sc, kept, n, C, c);
        x_out[((long)b * rows + q) * C + c] = Num<T>::store(v);
    }
    if (blockIdx.x == 0)
        for (int q = q0 + threadIdx.x; q < min(q1, keep); q += blockDim.x) idx[(long)b * keep + q] = out_src[q];
}

int check_launch(const char* what) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return fail(EDGETOK_ERR_CUDA, std::string(what) + ": " + cudaGetErrorString(e) +
                                          " (is a CUDA device visible and the library built for its arch?)");
    return EDGETOK_OK;
}

dim3 to_dim3(Grid g) { return dim3(g.x, g.y, g.z); }

struct Workspace {
    float* best;
    int* bidx;
    Workspace(void* base, int64_t b, int64_t n) {
        best = static_cast<float*>(base);
        bidx = reinterpret_cast<int*>(static_cast<char*>(base) + align_up(sizeof(float) * b * ((n + 1) / 2)));
    }
};

template <class T>
int run_match(const T* metric, const T* size, int b, int n, int ck, int pf, const Workspace& ws, cudaStream_t st) {
    const int chunk = match_chunk(ck);
    match_kernel<T><<<to_dim3(match_grid(b, n)), kThreads, match_smem(ck), st>>>(metric, size, n, ck, pf, chunk,
                                                                                  ws.best, ws.bidx);
    return check_launch("edgetok match kernel");
}

template <class T>
int token_merge_t(const void* x, const void* metric, const void* size, void* x_out, void* size_out, int b, int n,
                  int c, int ck, int r, int pf, void* workspace, cudaStream_t st) {
    Workspace ws(workspace, b, n);
    int rc = run_match<T>(static_cast<const T*>(metric), nullptr, b, n, ck, pf, ws, st);
    if (rc) return rc;
    merge_output_kernel<T><<<to_dim3(output_grid(b, n - r, c)), kThreads, merge_smem(n), st>>>(
        static_cast<const T*>(x), static_cast<const T*>(size), ws.best, ws.bidx, n, c, pf, r, 0.f, nullptr,
        static_cast<T*>(x_out), static_cast<T*>(size_out));
    return check_launch("edgetok token_merge kernel");
}

template <class T>
int threshold_merge_t(const void* x, const void* metric, const void* size, void* x_out, void* size_out,
                      int64_t* count, int64_t* max_count, int b, int n, int c, int ck, float thr, int pf,
                      void* workspace, cudaStream_t st) {
    Workspace ws(workspace, b, n);
    const T* sz = static_cast<const T*>(size);
    int rc = run_match<T>(static_cast<const T*>(metric), sz, b, n, ck, pf, ws, st);
    if (rc) return rc;
    count_kernel<T><<<b, kThreads, merge_smem(n), st>>>(sz, ws.best, ws.bidx, n, pf, thr, count, max_count);
    if ((rc = check_launch("edgetok threshold count kernel"))) return rc;
    // Launched for the upper bound N rows; blocks past the device-side max exit at once.
    merge_output_kernel<T><<<to_dim3(output_grid(b, n, c)), kThreads, merge_smem(n), st>>>(
        static_cast<const T*>(x), sz, ws.best, ws.bidx, n, c, pf, 0, thr, max_count, static_cast<T*>(x_out),
        static_cast<T*>(size_out));
    return check_launch("edgetok threshold_merge kernel");
}

template <class T>
int token_drop_t(const void* x, const void* score, void* x_out, int64_t* idx, int b, int n, int c, int keep, int pf,
                 int fuse, cudaStream_t st) {
    drop_kernel<T><<<to_dim3(output_grid(b, keep + fuse, c)), kThreads, drop_smem(n), st>>>(
        static_cast<const T*>(x), static_cast<const T*>(score), static_cast<T*>(x_out), idx, n, c, keep, pf, fuse);
    return check_launch("edgetok token_drop kernel");
}

// dtype dispatch: F(T) is instantiated for every dtype the library carries.
#define ET_DISPATCH(dtype, CALL)                                                              \
    switch (dtype) {                                                                          \
        case EDGETOK_F32: { using T = float; return CALL; }                                    \
        case EDGETOK_F16: { using T = __half; return CALL; }                                   \
        case EDGETOK_BF16: { using T = __nv_bfloat16; return CALL; }                           \
        default: return fail(EDGETOK_ERR_DTYPE, "unknown dtype code " + std::to_string(dtype) + \
                                                " (use 0=float32, 1=float16, 2=bfloat16)");   \
    }

int check_shape(int64_t b, int64_t n, int64_t c, int64_t pf) {
    if (b < 0 || n < 1 || c < 1 || pf < 0 || pf > n || n > (1 << 24) || c > (1 << 24) || b > (1 << 24))
        return fail(EDGETOK_ERR_ARGUMENT, "bad shape: batch=" + std::to_string(b) + " n=" + std::to_string(n) +
                                              " c=" + std::to_string(c) + " protect_first=" + std::to_string(pf));
    return EDGETOK_OK;
}

int check_workspace(size_t have, size_t need) {
    if (have < need)
        return fail(EDGETOK_ERR_WORKSPACE, "workspace of " + std::to_string(have) + " bytes, need " +
                                               std::to_string(need) + " (ask *_workspace_size)");
    return EDGETOK_OK;
}

int check_supported(int n, int ck, bool match, bool drop) {
    if (const char* why = unsupported_reason(n, ck, match, drop))
        return fail(EDGETOK_ERR_UNSUPPORTED, std::string(why) + " (n=" + std::to_string(n) +
                                                 ", ck=" + std::to_string(ck) + "); use the torch reference");
    return EDGETOK_OK;
}

}  // namespace
}  // namespace edgetok

using namespace edgetok;

extern "C" {

int edgetok_abi_version(void) { return 1; }
const char* edgetok_last_error(void) { return g_error.c_str(); }

int edgetok_token_merge_supported(int64_t n, int64_t ck) {
    return n >= 1 && ck >= 1 && n <= (1 << 24) && ck <= (1 << 24) && !unsupported_reason((int)n, (int)ck, true, false);
}
int edgetok_token_drop_supported(int64_t n) {
    return n >= 1 && n <= (1 << 24) && !unsupported_reason((int)n, 1, false, true);
}

size_t edgetok_token_merge_workspace_size(int64_t batch, int64_t n) { return match_workspace(batch, n); }
size_t edgetok_threshold_merge_workspace_size(int64_t batch, int64_t n) { return match_workspace(batch, n); }
size_t edgetok_token_drop_workspace_size(int64_t, int64_t) { return 0; }

int edgetok_token_merge(int dtype, const void* x, const void* metric, const void* size, void* x_out, void* size_out,
                        int64_t batch, int64_t n, int64_t c, int64_t ck, int64_t r, int64_t protect_first,
                        void* workspace, size_t workspace_size, void* stream) {
    int rc = check_shape(batch, n, c, protect_first);
    if (rc) return rc;
    if (ck < 1) return fail(EDGETOK_ERR_ARGUMENT, "metric width must be >= 1");
    const int limit = max_merges((int)n, (int)protect_first);
    if (r < 0 || r > limit)
        return fail(EDGETOK_ERR_ARGUMENT, "cannot merge r=" + std::to_string(r) + " of " + std::to_string(n) +
                                              " tokens (at most " + std::to_string(limit) + "); lower r");
    if ((rc = check_supported((int)n, (int)ck, true, false))) return rc;
    if ((rc = check_workspace(workspace_size, match_workspace(batch, n)))) return rc;
    auto st = static_cast<cudaStream_t>(stream);
    if (batch == 0) return EDGETOK_OK;
    if (r == 0) {  // the reference returns its input unchanged (no reordering)
        size_t es = dtype == EDGETOK_F32 ? 4 : 2;
        cudaMemcpyAsync(x_out, x, es * batch * n * c, cudaMemcpyDeviceToDevice, st);
        cudaMemcpyAsync(size_out, size, es * batch * n, cudaMemcpyDeviceToDevice, st);
        return check_launch("edgetok token_merge copy");
    }
    ET_DISPATCH(dtype, token_merge_t<T>(x, metric, size, x_out, size_out, (int)batch, (int)n, (int)c, (int)ck,
                                        (int)r, (int)protect_first, workspace, st))
}

int edgetok_token_drop(int dtype, const void* x, const void* score, void* x_out, int64_t* idx, int64_t batch,
                       int64_t n, int64_t c, int64_t keep, int64_t protect_first, int64_t fuse_dropped,
                       void* workspace, size_t workspace_size, void* stream) {
    (void)workspace, (void)workspace_size;
    int rc = check_shape(batch, n, c, protect_first);
    if (rc) return rc;
    const int64_t lo = protect_first > 1 ? protect_first : 1;
    if (keep < lo || keep > n)
        return fail(EDGETOK_ERR_ARGUMENT, "cannot keep " + std::to_string(keep) + " of " + std::to_string(n) +
                                              " tokens (keep must be between " + std::to_string(lo) + " and n)");
    if (fuse_dropped != 0 && fuse_dropped != 1) return fail(EDGETOK_ERR_ARGUMENT, "fuse_dropped must be 0 or 1");
    if ((rc = check_supported((int)n, 1, false, true))) return rc;
    if (batch == 0) return EDGETOK_OK;
    ET_DISPATCH(dtype, token_drop_t<T>(x, score, x_out, idx, (int)batch, (int)n, (int)c, (int)keep,
                                       (int)protect_first, (int)fuse_dropped, static_cast<cudaStream_t>(stream)))
}

int edgetok_threshold_merge(int dtype, const void* x, const void* metric, const void* size, void* x_out,
                            void* size_out, int64_t* count, int64_t* max_count, int64_t batch, int64_t n, int64_t c,
                            int64_t ck, float threshold, int64_t protect_first, void* workspace,
                            size_t workspace_size, void* stream) {
    int rc = check_shape(batch, n, c, protect_first);
    if (rc) return rc;
    if (ck < 1) return fail(EDGETOK_ERR_ARGUMENT, "metric width must be >= 1");
    if ((rc = check_supported((int)n, (int)ck, true, false))) return rc;
    if ((rc = check_workspace(workspace_size, match_workspace(batch, n)))) return rc;
    auto st = static_cast<cudaStream_t>(stream);
    cudaMemsetAsync(max_count, 0, sizeof(int64_t), st);
    if ((rc = check_launch("edgetok threshold_merge memset"))) return rc;
    if (batch == 0) return EDGETOK_OK;
    ET_DISPATCH(dtype, threshold_merge_t<T>(x, metric, size, x_out, size_out, count, max_count, (int)batch, (int)n,
                                            (int)c, (int)ck, threshold, (int)protect_first, workspace, st))
}

}  // extern "C"
