// edgetok fused reduction kernels and their C API.
//
// token_merge      3 launches: match (A->B best match, row-parallel), plan (one block per image:
//                  rank, groups, output slots into the workspace), output (gather + size-weighted
//                  merge, tiled over channels x rows x batch).
// token_drop       2 launches: plan (rank, kept indices, dropped list), output (gather + fused token).
// threshold_merge  memset + 3 launches: match, plan (also the per-image count and the batch max),
//                  output (row stride M = the batch max, read on the device).
// The plans and output blocks are the shared code in launch.h / plan.h; the CPU library runs
// the same block bodies over the same grids (host_reference.cpp).
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
    extern __shared__ float smem_f[];
    const Split s = split(n, pf);
    const int b = blockIdx.y, row0 = blockIdx.x * kMatchWarps;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int lda = match_lda(ck), ldb = match_ldb(chunk);  // odd strides: see launch.h
    float* sa = smem_f;                       // [kMatchWarps][lda] A rows
    float* norm_a = sa + kMatchWarps * lda;   // [kMatchWarps]
    float* sb = norm_a + kMatchWarps;         // [ck][ldb] staged B columns, transposed
    float* norm_b = sb + ck * ldb;            // [chunk]
    const T* m = metric + (long)b * n * ck;
    const T* sz = size ? size + (long)b * n : nullptr;
    const int rows = min(kMatchWarps, s.na - row0);

    for (int e = tid; e < rows * ck; e += blockDim.x) {
        int w = e / ck, k = e % ck;
        sa[w * lda + k] = Num<T>::load(m[(long)(2 * (row0 + w)) * ck + k]);
    }
    __syncthreads();
    if (tid < rows) norm_a[tid] = clamped_norm(sa + tid * lda, ck, 1);
    const int i = row0 + warp;
    const bool row_ok = warp < rows && i >= s.pa && (!sz || Num<T>::load(sz[2 * i]) > 0.f);
    float bs = -INFINITY;
    int bj = 0;
    for (int j0 = 0; j0 < s.nb; j0 += chunk) {
        const int cnt = min(chunk, s.nb - j0);
        __syncthreads();  // the previous chunk is consumed
        for (int e = tid; e < cnt * ck; e += blockDim.x) {  // coalesced reads along k
            int jj = e / ck, k = e % ck;
            sb[k * ldb + jj] = Num<T>::load(m[(long)(2 * (j0 + jj) + 1) * ck + k]);
        }
        __syncthreads();
        if (tid < cnt) norm_b[tid] = clamped_norm(sb + tid, ck, ldb);
        __syncthreads();
        if (!row_ok) continue;
        for (int jj = lane; jj < cnt; jj += 32) {
            const int j = j0 + jj;
            const bool ok = j >= s.pb && (!sz || Num<T>::load(sz[2 * j + 1]) > 0.f);
            float sc = -INFINITY;
            if (ok) {
                float dot = 0.f;
                for (int k = 0; k < ck; ++k) dot += sa[warp * lda + k] * sb[k * ldb + jj];
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

// Plan kernels: one block per image (blockIdx.x), scratch in shared memory or the workspace.
__global__ void __launch_bounds__(kThreads)
    token_merge_plan_kernel(char* __restrict__ ws, WsLayout w, int n, int pf, int r) {
    extern __shared__ uint64_t smem_k[];
    DeviceBlock blk;
    token_merge_plan_block(blk, blockIdx.x, ws, w, smem_k, n, pf, r);
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    threshold_merge_plan_kernel(const T* __restrict__ size, char* __restrict__ ws, WsLayout w, int n, int pf,
                                float threshold, int64_t* __restrict__ count, int64_t* __restrict__ max_count) {
    extern __shared__ uint64_t smem_k[];
    DeviceBlock blk;
    threshold_merge_plan_block(blk, blockIdx.x, size, ws, w, smem_k, n, pf, threshold, count, max_count);
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    token_drop_plan_kernel(const T* __restrict__ score, int64_t* __restrict__ idx, char* __restrict__ ws,
                           WsLayout w, int n, int keep, int pf) {
    extern __shared__ uint64_t smem_k[];
    DeviceBlock blk;
    token_drop_plan_block(blk, blockIdx.x, score, idx, ws, w, smem_k, n, keep, pf);
}

// Output kernels: gather only. rows_dev != null: threshold mode, the row stride is the batch
// max the plan kernels left on the device.
template <class T>
__global__ void __launch_bounds__(kThreads)
    merge_output_kernel(const T* __restrict__ x, const T* __restrict__ size, char* __restrict__ ws, WsLayout w,
                        int n, int C, int rows, const int64_t* __restrict__ rows_dev,
                        const int64_t* __restrict__ count, T* __restrict__ x_out, T* __restrict__ size_out) {
    DeviceBlock blk;
    merge_output_block(blk, blockIdx.x, blockIdx.y, blockIdx.z, x, size, ws, w, n, C,
                       rows_dev ? (int)*rows_dev : rows, count, x_out, size_out);
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    drop_output_kernel(const T* __restrict__ x, const T* __restrict__ score, const int64_t* __restrict__ idx,
                       char* __restrict__ ws, WsLayout w, int n, int C, int keep, int fuse, T* __restrict__ x_out) {
    DeviceBlock blk;
    drop_output_block(blk, blockIdx.x, blockIdx.y, blockIdx.z, x, score, idx, ws, w, n, C, keep, fuse, x_out);
}

int check_launch(const char* what) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return fail(EDGETOK_ERR_CUDA, std::string(what) + ": " + cudaGetErrorString(e) +
                                          " (is a CUDA device visible and the library built for its arch?)");
    return EDGETOK_OK;
}

dim3 to_dim3(Grid g) { return dim3(g.x, g.y, g.z); }

// Workspace regions of one call (launch.h's layout).
float* ws_best(void* ws, const WsLayout& w) { return reinterpret_cast<float*>(static_cast<char*>(ws) + w.best); }
int* ws_bidx(void* ws, const WsLayout& w) { return reinterpret_cast<int*>(static_cast<char*>(ws) + w.bidx); }

template <class T>
int run_match(const T* metric, const T* size, int b, int n, int ck, int pf, void* ws, const WsLayout& w,
              cudaStream_t st) {
    const int chunk = match_chunk(ck);
    match_kernel<T><<<to_dim3(match_grid(b, n)), kThreads, match_smem(ck), st>>>(metric, size, n, ck, pf, chunk,
                                                                                  ws_best(ws, w), ws_bidx(ws, w));
    return check_launch("edgetok match kernel");
}

template <class T>
int token_merge_t(const void* x, const void* metric, const void* size, void* x_out, void* size_out, int b, int n,
                  int c, int ck, int r, int pf, void* workspace, cudaStream_t st) {
    const WsLayout w = merge_layout(b, n);
    char* ws = static_cast<char*>(workspace);
    int rc = run_match<T>(static_cast<const T*>(metric), nullptr, b, n, ck, pf, ws, w, st);
    if (rc) return rc;
    token_merge_plan_kernel<<<to_dim3(plan_grid(b)), kThreads, plan_smem((n + 1) / 2), st>>>(ws, w, n, pf, r);
    if ((rc = check_launch("edgetok token_merge plan kernel"))) return rc;
    merge_output_kernel<T><<<to_dim3(output_grid(b, n - r, c)), kThreads, 0, st>>>(
        static_cast<const T*>(x), static_cast<const T*>(size), ws, w, n, c, n - r, nullptr, nullptr,
        static_cast<T*>(x_out), static_cast<T*>(size_out));
    return check_launch("edgetok token_merge output kernel");
}

template <class T>
int threshold_merge_t(const void* x, const void* metric, const void* size, void* x_out, void* size_out,
                      int64_t* count, int64_t* max_count, int b, int n, int c, int ck, float thr, int pf,
                      void* workspace, cudaStream_t st) {
    const WsLayout w = merge_layout(b, n);
    char* ws = static_cast<char*>(workspace);
    const T* sz = static_cast<const T*>(size);
    int rc = run_match<T>(static_cast<const T*>(metric), sz, b, n, ck, pf, ws, w, st);
    if (rc) return rc;
    threshold_merge_plan_kernel<T><<<to_dim3(plan_grid(b)), kThreads, plan_smem((n + 1) / 2), st>>>(
        sz, ws, w, n, pf, thr, count, max_count);
    if ((rc = check_launch("edgetok threshold_merge plan kernel"))) return rc;
    // Launched for the upper bound N rows; blocks past the device-side max exit at once.
    merge_output_kernel<T><<<to_dim3(output_grid(b, n, c)), kThreads, 0, st>>>(
        static_cast<const T*>(x), sz, ws, w, n, c, n, max_count, count, static_cast<T*>(x_out),
        static_cast<T*>(size_out));
    return check_launch("edgetok threshold_merge output kernel");
}

template <class T>
int token_drop_t(const void* x, const void* score, void* x_out, int64_t* idx, int b, int n, int c, int keep, int pf,
                 int fuse, void* workspace, cudaStream_t st) {
    const WsLayout w = drop_layout(b, n);
    char* ws = static_cast<char*>(workspace);
    const T* sc = static_cast<const T*>(score);
    token_drop_plan_kernel<T><<<to_dim3(plan_grid(b)), kThreads, plan_smem(n), st>>>(sc, idx, ws, w, n, keep, pf);
    int rc = check_launch("edgetok token_drop plan kernel");
    if (rc) return rc;
    drop_output_kernel<T><<<to_dim3(output_grid(b, keep + fuse, c)), kThreads, 0, st>>>(
        static_cast<const T*>(x), sc, idx, ws, w, n, c, keep, fuse, static_cast<T*>(x_out));
    return check_launch("edgetok token_drop output kernel");
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
    if (b < 0 || n < 1 || c < 1 || pf < 0 || pf > n || n > (1 << 24) || c > (1 << 24))
        return fail(EDGETOK_ERR_ARGUMENT, "bad shape: batch=" + std::to_string(b) + " n=" + std::to_string(n) +
                                              " c=" + std::to_string(c) + " protect_first=" + std::to_string(pf));
    if (b > kMaxBatch)
        return fail(EDGETOK_ERR_ARGUMENT, "batch " + std::to_string(b) + " is above the kernels' grid limit " +
                                              std::to_string(kMaxBatch) + "; split the batch");
    return EDGETOK_OK;
}

int check_workspace(size_t have, size_t need, const char* query) {
    if (have < need)
        return fail(EDGETOK_ERR_WORKSPACE, "workspace of " + std::to_string(have) + " bytes, need " +
                                               std::to_string(need) + " (size it with " + query + ")");
    return EDGETOK_OK;
}

int check_supported(int64_t n, int64_t ck, bool match) {
    if (const char* why = unsupported_reason(n, ck, match))
        return fail(EDGETOK_ERR_UNSUPPORTED, std::string(why) + " (n=" + std::to_string(n) +
                                                 ", ck=" + std::to_string(ck) + "); use the torch reference");
    return EDGETOK_OK;
}

}  // namespace
}  // namespace edgetok

using namespace edgetok;

extern "C" {

// 2: token_drop takes a workspace (edgetok_token_drop_workspace_size) for its plan.
int edgetok_abi_version(void) { return 2; }
const char* edgetok_last_error(void) { return g_error.c_str(); }

int edgetok_token_merge_supported(int64_t n, int64_t ck) {
    return n >= 1 && ck >= 1 && ck <= (1 << 24) && !unsupported_reason(n, ck, true);
}
int edgetok_token_drop_supported(int64_t n) { return n >= 1 && !unsupported_reason(n, 1, false); }

size_t edgetok_token_merge_workspace_size(int64_t batch, int64_t n) { return merge_layout(batch, n).total; }
size_t edgetok_threshold_merge_workspace_size(int64_t batch, int64_t n) { return merge_layout(batch, n).total; }
size_t edgetok_token_drop_workspace_size(int64_t batch, int64_t n) { return drop_layout(batch, n).total; }

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
    if ((rc = check_supported(n, ck, true))) return rc;
    if ((rc = check_workspace(workspace_size, merge_layout(batch, n).total, "edgetok_token_merge_workspace_size")))
        return rc;
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
    int rc = check_shape(batch, n, c, protect_first);
    if (rc) return rc;
    const int64_t lo = protect_first > 1 ? protect_first : 1;
    if (keep < lo || keep > n)
        return fail(EDGETOK_ERR_ARGUMENT, "cannot keep " + std::to_string(keep) + " of " + std::to_string(n) +
                                              " tokens (keep must be between " + std::to_string(lo) + " and n)");
    if (fuse_dropped != 0 && fuse_dropped != 1) return fail(EDGETOK_ERR_ARGUMENT, "fuse_dropped must be 0 or 1");
    if ((rc = check_supported(n, 1, false))) return rc;
    if ((rc = check_workspace(workspace_size, drop_layout(batch, n).total, "edgetok_token_drop_workspace_size")))
        return rc;
    if (batch == 0) return EDGETOK_OK;
    ET_DISPATCH(dtype, token_drop_t<T>(x, score, x_out, idx, (int)batch, (int)n, (int)c, (int)keep,
                                       (int)protect_first, (int)fuse_dropped, workspace,
                                       static_cast<cudaStream_t>(stream)))
}

int edgetok_threshold_merge(int dtype, const void* x, const void* metric, const void* size, void* x_out,
                            void* size_out, int64_t* count, int64_t* max_count, int64_t batch, int64_t n, int64_t c,
                            int64_t ck, float threshold, int64_t protect_first, void* workspace,
                            size_t workspace_size, void* stream) {
    int rc = check_shape(batch, n, c, protect_first);
    if (rc) return rc;
    if (ck < 1) return fail(EDGETOK_ERR_ARGUMENT, "metric width must be >= 1");
    if ((rc = check_supported(n, ck, true))) return rc;
    if ((rc = check_workspace(workspace_size, merge_layout(batch, n).total,
                              "edgetok_threshold_merge_workspace_size")))
        return rc;
    auto st = static_cast<cudaStream_t>(stream);
    cudaMemsetAsync(max_count, 0, sizeof(int64_t), st);
    if ((rc = check_launch("edgetok threshold_merge memset"))) return rc;
    if (batch == 0) return EDGETOK_OK;
    ET_DISPATCH(dtype, threshold_merge_t<T>(x, metric, size, x_out, size_out, count, max_count, (int)batch, (int)n,
                                            (int)c, (int)ck, threshold, (int)protect_first, workspace, st))
}

}  // extern "C"
