/* edgetok fused reduction kernels: C API (libedgetok_kernels.so).
 *
 * Semantics: the op contract in edgetok/reduce/{tome,drop,dymu}.py. All tensors are
 * contiguous device memory; x, metric, size and score share one dtype; indices and
 * counts are int64. `stream` is a cudaStream_t (null: the legacy default stream).
 * Every launcher is asynchronous and CUDA-graph capturable (no host sync, no
 * allocation): scratch memory comes from the caller through `workspace`, sized by
 * the matching *_workspace_size query. batch is at most 65535 (a CUDA grid dimension).
 * Return value: 0 on success, else an EDGETOK_ERR_* code; edgetok_last_error()
 * gives a one-line message for the calling thread.
 */
#ifndef EDGETOK_KERNELS_H
#define EDGETOK_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EDGETOK_API __attribute__((visibility("default")))

enum edgetok_dtype { EDGETOK_F32 = 0, EDGETOK_F16 = 1, EDGETOK_BF16 = 2 };

enum edgetok_status {
    EDGETOK_OK = 0,
    EDGETOK_ERR_ARGUMENT = 1,    /* bad shape or attribute */
    EDGETOK_ERR_DTYPE = 2,       /* dtype not built */
    EDGETOK_ERR_WORKSPACE = 3,   /* workspace smaller than the query said */
    EDGETOK_ERR_UNSUPPORTED = 4, /* shape beyond the kernels' limits (see *_supported) */
    EDGETOK_ERR_CUDA = 5         /* a CUDA call or launch failed */
};

EDGETOK_API int edgetok_abi_version(void);
EDGETOK_API const char* edgetok_last_error(void);

/* 1 if the kernels can run this shape (else the caller falls back to a reference). Every
 * token count up to 1,048,560 runs (plans too large for shared memory use the workspace);
 * the metric width ck is limited by the match kernel's shared-memory staging (about 1,500). */
EDGETOK_API int edgetok_token_merge_supported(int64_t n, int64_t ck);
EDGETOK_API int edgetok_token_drop_supported(int64_t n);

/* Workspace bytes for a call with this batch and token count; nondecreasing in both, so the
 * size for a profile's largest shape covers every smaller one. */
EDGETOK_API size_t edgetok_token_merge_workspace_size(int64_t batch, int64_t n);
EDGETOK_API size_t edgetok_threshold_merge_workspace_size(int64_t batch, int64_t n);
EDGETOK_API size_t edgetok_token_drop_workspace_size(int64_t batch, int64_t n);

/* ToMe: x[B,N,C], metric[B,N,Ck], size[B,N,1] -> x_out[B,N-r,C], size_out[B,N-r,1]. */
EDGETOK_API int edgetok_token_merge(int dtype, const void* x, const void* metric, const void* size, void* x_out,
                                    void* size_out, int64_t batch, int64_t n, int64_t c, int64_t ck, int64_t r,
                                    int64_t protect_first, void* workspace, size_t workspace_size, void* stream);

/* Top-k keep: x[B,N,C], score[B,N] -> x_out[B,keep(+1),C], idx[B,keep] (ascending). Since ABI 2
 * it needs a workspace of edgetok_token_drop_workspace_size(batch, n) bytes. */
EDGETOK_API int edgetok_token_drop(int dtype, const void* x, const void* score, void* x_out, int64_t* idx,
                                   int64_t batch, int64_t n, int64_t c, int64_t keep, int64_t protect_first,
                                   int64_t fuse_dropped, void* workspace, size_t workspace_size, void* stream);

/* DyMU: outputs are written as [B,M,C] / [B,M,1] with M = max(count) (written to *max_count,
 * int64 on the device); x_out and size_out must have room for B*N*C and B*N values.
 * count[B] int64 is the valid row count of each image; rows past it are zero (size 0). */
EDGETOK_API int edgetok_threshold_merge(int dtype, const void* x, const void* metric, const void* size, void* x_out,
                                        void* size_out, int64_t* count, int64_t* max_count, int64_t batch, int64_t n,
                                        int64_t c, int64_t ck, float threshold, int64_t protect_first,
                                        void* workspace, size_t workspace_size, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* EDGETOK_KERNELS_H */
