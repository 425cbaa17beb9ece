// Per-image plans of the edgetok ops, shared by the CUDA kernels and the CPU test library.
//
// A plan says, for one image, which tokens merge or stay and where every output row comes
// from. One block of kThreads threads computes it once per image (the plan kernels) into
// the workspace; the output kernels then only gather and reduce over channels.
//
// A plan is a short sequence of phases. Block::run(f) calls f(tid, nt) for every thread of
// the block, then waits for all of them: on the GPU, DeviceBlock runs each thread's share
// and __syncthreads(); the CPU library's HostBlock runs the threads one after the other, in
// either order. Inside a phase a thread reads only what earlier phases wrote, so both give
// the same result; running the threads in reverse order (a test does) catches a phase that
// breaks that rule. Block::tick counts inner-loop iterations on the CPU (the plan-work test
// and docs/plugins.md's operation counts); on the GPU it is empty.
//
// Ranking is a sort of distinct 64-bit keys (score, index): each thread sorts runs of kRun
// keys with a sorting network, then merge-path passes merge pairs of runs, each thread
// finding where its kRun outputs start by one binary search. Ties cannot reorder because
// no two keys are equal: the index is part of the key.
#pragma once

#include <stddef.h>

#include "rowops.h"

#if defined(__CUDA_ARCH__)
#define ET_UNROLL _Pragma("unroll")
#else
#define ET_UNROLL
#endif

namespace edgetok {

ET_HD int imin(int a, int b) { return a < b ? a : b; }
ET_HD int imax(int a, int b) { return a > b ? a : b; }

#if defined(__CUDACC__)
struct DeviceBlock {
    template <class F>
    __device__ __forceinline__ void run(F&& f) {
        f((int)threadIdx.x, (int)blockDim.x);
        __syncthreads();
    }
    __device__ __forceinline__ void tick(long) {}
    __device__ __forceinline__ void begin_plan() {}
};
#endif

// Largest int64 into *p (the batch-max row count of threshold_merge).
ET_HD void max_into(int64_t* p, int64_t v) {
#if defined(__CUDA_ARCH__)
    atomicMax(reinterpret_cast<unsigned long long*>(p), (unsigned long long)v);
#else
    if (*p < v) *p = v;
#endif
}

// ---------------------------------------------------------------------------
// Block sort of distinct keys.
// ---------------------------------------------------------------------------
constexpr int kRun = 8;            // keys one thread sorts alone before the merge passes
constexpr int kRunCompares = 28;   // compare-exchanges of the sorting network on kRun keys

// Slot of element e in a key array: one spare slot per kRun keys, so the runs that a warp's
// threads read and write side by side start 9 keys (18 banks) apart: no bank conflicts.
ET_HD int spad(int e) { return e + e / kRun; }
ET_HD size_t padded_keys(int L) { return (size_t)L + (size_t)L / kRun + 1; }

// Odd-even transposition network: kRun rounds of compare-exchanges on neighbours.
ET_HD void sort_run(uint64_t (&v)[kRun]) {
    ET_UNROLL for (int round = 0; round < kRun; ++round)
        ET_UNROLL for (int i = round & 1; i + 1 < kRun; i += 2)
            if (v[i] > v[i + 1]) {
                const uint64_t t = v[i];
                v[i] = v[i + 1], v[i + 1] = t;
            }
}

// Sorts the L distinct keys key(0), ..., key(L-1) ascending and returns the array holding the
// result (keys0 or keys1, padded_keys(L) slots each, read at spad(p)). key() is called in the
// first phase only; it may read keys0 at the element it is asked for.
template <class Block, class KeyOf>
ET_HD uint64_t* block_sort(Block& blk, int L, KeyOf key, uint64_t* keys0, uint64_t* keys1) {
    const int runs = (L + kRun - 1) / kRun;
    blk.run([&](int tid, int nt) {
        for (int g = tid; g < runs; g += nt) {
            const int base = g * kRun, len = imin(kRun, L - base);
            uint64_t v[kRun];
            // ~0 pads a short run and sorts last: a real key's low word is an index < 2^31.
            ET_UNROLL for (int k = 0; k < kRun; ++k) v[k] = k < len ? key(base + k) : ~0ull;
            sort_run(v);
            ET_UNROLL for (int k = 0; k < kRun; ++k) if (k < len) keys0[spad(base + k)] = v[k];
            blk.tick(kRunCompares);
        }
    });
    uint64_t *src = keys0, *dst = keys1;
    for (int w = kRun; w < L; w *= 2) {
        blk.run([&](int tid, int nt) {
            for (int g = tid; g < runs; g += nt) {
                // Outputs [o, o + kRun) of merging runs [s, s + la) and [s + la, s + la + lb).
                const int o = g * kRun, s = o - o % (2 * w);
                const int la = imin(w, L - s), lb = imin(w, L - s - la), d = o - s;
                const uint64_t* a = src;
                auto A = [&](int i) { return a[spad(s + i)]; };
                auto B = [&](int i) { return a[spad(s + la + i)]; };
                int lo = imax(0, d - lb), hi = imin(d, la);  // how many of the first d come from A
                while (lo < hi) {
                    const int mid = (lo + hi) / 2;
                    if (A(mid) < B(d - 1 - mid)) lo = mid + 1;
                    else hi = mid;
                    blk.tick(1);
                }
                int ia = lo, ib = d - lo;
                const int cnt = imin(kRun, L - o);
                for (int k = 0; k < cnt; ++k) {
                    const bool from_a = ib >= lb || (ia < la && A(ia) < B(ib));
                    dst[spad(o + k)] = from_a ? A(ia++) : B(ib++);
                }
                blk.tick(cnt);
            }
        });
        uint64_t* t = src;
        src = dst, dst = t;
    }
    return src;
}

// ---------------------------------------------------------------------------
// Block scan: the rank of each selected element among the selected ones, in index order.
// ---------------------------------------------------------------------------
constexpr int kScanGroup = 16;  // per-thread counts summed per group

ET_HD int scan_groups(int nt) { return (nt + kScanGroup - 1) / kScanGroup; }
// Per-thread counts are stored one spare slot per group, so that the group sums read them
// 17 apart: no bank conflicts.
ET_HD int ppad(int t) { return t + t / kScanGroup; }
ET_HD size_t padded_parts(int nt) { return (size_t)nt + nt / kScanGroup + 1; }

// Elements [e0, e1) of thread tid: contiguous, an odd count per thread, so that a warp's
// threads reading their i-th elements at once hit distinct banks.
ET_HD void scan_chunk(int L, int tid, int nt, int& e0, int& e1) {
    const int c = ((L + nt - 1) / nt) | 1;
    e0 = imin(L, tid * c);
    e1 = imin(L, e0 + c);
}

// Two phases: each thread counts its selected elements, then groups of counts are summed.
template <class Block, class Pred>
ET_HD void scan_count(Block& blk, int L, Pred selected, int* part, int* gsum) {
    blk.run([&](int tid, int nt) {
        int e0, e1, c = 0;
        scan_chunk(L, tid, nt, e0, e1);
        for (int e = e0; e < e1; ++e) c += selected(e) ? 1 : 0;
        part[ppad(tid)] = c;
        blk.tick(e1 - e0);
    });
    blk.run([&](int tid, int nt) {
        for (int g = tid; g < scan_groups(nt); g += nt) {
            int c = 0;
            for (int t = g * kScanGroup; t < imin(nt, (g + 1) * kScanGroup); ++t) c += part[ppad(t)];
            gsum[g] = c;
            blk.tick(kScanGroup);
        }
    });
}

// In a later phase: emit(e, rank) for each selected element of thread tid's share, rank =
// how many selected elements come before e.
template <class Block, class Pred, class Emit>
ET_HD void scan_emit(Block& blk, int L, int tid, int nt, const int* part, const int* gsum, Pred selected,
                     Emit emit) {
    int rank = 0;
    const int g = tid / kScanGroup;
    for (int h = 0; h < g; ++h) rank += gsum[h];
    for (int t = g * kScanGroup; t < tid; ++t) rank += part[ppad(t)];
    int e0, e1;
    scan_chunk(L, tid, nt, e0, e1);
    for (int e = e0; e < e1; ++e)
        if (selected(e)) emit(e, rank++);
    blk.tick(g + (tid - g * kScanGroup) + (e1 - e0));
}

ET_HD int scan_total(const int* gsum, int nt) {
    int c = 0;
    for (int g = 0; g < scan_groups(nt); ++g) c += gsum[g];
    return c;
}

// ---------------------------------------------------------------------------
// Plans.
// ---------------------------------------------------------------------------

// An image's merge plan (workspace): written by the plan kernel, read by the output kernel.
struct MergePlan {
    int* src;    // [n] output row q: token src[q] copied (< n), or merged B column src[q] - n
    int* boff;   // [nb + 1] A rows merged into B column j: blist[boff[j] .. boff[j+1])
    int* blist;  // [na] grouped by destination, ascending inside a group
};

// A plan block's scratch (shared memory, or the workspace when it does not fit): two key
// arrays, the scans' per-thread counts and group sums, one flag per element.
struct PlanScratch {
    uint64_t* keys[2];
    int* part;
    int* gsum;
    unsigned char* flag;
};

ET_HD size_t plan_scratch_bytes(int L, int nt) {
    return sizeof(uint64_t) * 2 * padded_keys(L) + sizeof(int) * (padded_parts(nt) + scan_groups(nt)) + (size_t)L;
}
ET_HD PlanScratch carve_scratch(void* base, int L, int nt) {
    PlanScratch s;
    s.keys[0] = static_cast<uint64_t*>(base);
    s.keys[1] = s.keys[0] + padded_keys(L);
    s.part = reinterpret_cast<int*>(s.keys[1] + padded_keys(L));
    s.gsum = s.part + padded_parts(nt);
    s.flag = reinterpret_cast<unsigned char*>(s.gsum + scan_groups(nt));
    return s;
}

// Destination word of a row that merges nowhere: above every column, so it sorts last.
constexpr uint32_t kNoGroup = 0xffffffffu;

// boff / blist from the merged rows' group keys sorted ascending (m keys; rows that merge
// nowhere, if any, are at the end under kNoGroup).
template <class Block>
ET_HD void write_groups(Block& blk, const uint64_t* grouped, int m, int nb, const MergePlan& plan, int tid,
                        int nt) {
    for (int j = tid; j <= nb; j += nt) {
        const uint64_t first = group_key((uint32_t)j, 0);
        int lo = 0, hi = m;
        while (lo < hi) {
            const int mid = (lo + hi) / 2;
            if (grouped[spad(mid)] < first) lo = mid + 1;
            else hi = mid;
            blk.tick(1);
        }
        plan.boff[j] = lo;
        blk.tick(1);
    }
    for (int e = tid; e < m; e += nt) {
        plan.blist[e] = key_index(grouped[spad(e)]);
        blk.tick(1);
    }
}

// token_merge, 1 <= r <= max_merges: the A rows ranked by best score (descending, ties to
// the lower index); the first r merge into their best B column.
template <class Block>
ET_HD void token_merge_plan(Block& blk, const float* best, const int* bidx, int n, int pf, int r,
                            const MergePlan& plan, const PlanScratch& sc) {
    blk.begin_plan();
    const Split s = split(n, pf);
    uint64_t* ranked = block_sort(blk, s.na, [&](int i) { return rank_key(best[i], i); }, sc.keys[0], sc.keys[1]);
    uint64_t* other = ranked == sc.keys[0] ? sc.keys[1] : sc.keys[0];
    blk.run([&](int tid, int nt) {
        for (int p = tid; p < s.na; p += nt) {
            const int i = key_index(ranked[spad(p)]);
            sc.flag[i] = p < r;
            if (p < r) other[spad(p)] = group_key((uint32_t)bidx[i], i);
            blk.tick(1);
        }
    });
    const uint64_t* grouped = block_sort(blk, r, [&](int e) { return other[spad(e)]; }, other, ranked);
    const int la = s.na - s.pa;  // unprotected A rows; the protected ones never merge (score -inf)
    auto stays = [&](int e) { return sc.flag[s.pa + e] == 0; };
    scan_count(blk, la, stays, sc.part, sc.gsum);
    blk.run([&](int tid, int nt) {
        for (int t = tid; t < pf; t += nt) plan.src[t] = t;
        scan_emit(blk, la, tid, nt, sc.part, sc.gsum, stays, [&](int e, int q) { plan.src[pf + q] = 2 * (s.pa + e); });
        const int b0 = pf + la - r;  // B columns follow the unmerged A rows
        for (int j = s.pb + tid; j < s.nb; j += nt) plan.src[b0 + j - s.pb] = n + j;
        write_groups(blk, grouped, r, s.nb, plan, tid, nt);
    });
}

// threshold_merge: every A row whose best score is above thr merges (protected and padding
// rows score -inf); the output is the valid candidates [protected, unmerged A, B] in order.
// Writes the image's row count to *count and raises *max_count to it.
template <class Block, class T>
ET_HD void threshold_merge_plan(Block& blk, const float* best, const int* bidx, const T* size, int n, int pf,
                                float thr, const MergePlan& plan, const PlanScratch& sc, int64_t* count,
                                int64_t* max_count) {
    blk.begin_plan();
    const Split s = split(n, pf);
    auto merges = [&](int i) { return best[i] > thr; };
    const uint64_t* grouped = block_sort(
        blk, s.na, [&](int i) { return group_key(merges(i) ? (uint32_t)bidx[i] : kNoGroup, i); }, sc.keys[0],
        sc.keys[1]);
    const int la = s.na - s.pa, lb = s.nb - s.pb;
    auto valid = [&](int t) { return Num<T>::load(size[t]) > 0.f; };
    auto token = [&](int e) {  // candidate e -> plan entry
        if (e < pf) return e;
        if (e < pf + la) return 2 * (s.pa + e - pf);
        return n + s.pb + (e - pf - la);
    };
    auto kept = [&](int e) {
        const int t = token(e);
        if (t >= n) return valid(2 * (t - n) + 1);
        return valid(t) && (e < pf || !merges(t / 2));
    };
    const int L = pf + la + lb;
    scan_count(blk, L, kept, sc.part, sc.gsum);
    blk.run([&](int tid, int nt) {
        scan_emit(blk, L, tid, nt, sc.part, sc.gsum, kept, [&](int e, int q) { plan.src[q] = token(e); });
        write_groups(blk, grouped, s.na, s.nb, plan, tid, nt);
        if (tid == 0) {
            const int c = scan_total(sc.gsum, nt);
            *count = c;
            max_into(max_count, c);
        }
    });
}

// token_drop: tokens ranked protected first (as +inf), then by score descending, ties to
// the lower index; the first `keep` stay and go to idx in index order, the others go to
// dropped[] in rank order (the fused token's terms).
template <class Block, class T>
ET_HD void token_drop_plan(Block& blk, const T* score, int n, int keep, int pf, int64_t* idx, int* dropped,
                           const PlanScratch& sc) {
    blk.begin_plan();
    const uint64_t* ranked = block_sort(
        blk, n, [&](int t) { return rank_key(t < pf ? INFINITY : Num<T>::load(score[t]), t); }, sc.keys[0],
        sc.keys[1]);
    blk.run([&](int tid, int nt) {
        for (int p = tid; p < n; p += nt) {
            const int t = key_index(ranked[spad(p)]);
            sc.flag[t] = p < keep;
            if (p >= keep) dropped[p - keep] = t;
            blk.tick(1);
        }
    });
    auto kept = [&](int t) { return sc.flag[t] != 0; };
    scan_count(blk, n, kept, sc.part, sc.gsum);
    blk.run([&](int tid, int nt) {
        scan_emit(blk, n, tid, nt, sc.part, sc.gsum, kept, [&](int t, int q) { idx[q] = t; });
    });
}

// The fused token at channel c: sum(score * x) / max(sum(score), eps) over the dropped tokens.
template <class T>
ET_HD float drop_fused_value(const T* x, const T* score, const int* dropped, int m, int C, int c) {
    float acc = 0.f, wsum = 0.f;
    for (int p = 0; p < m; ++p) {
        const int t = dropped[p];
        const float w = Num<T>::load(score[t]);
        acc += w * Num<T>::load(x[(long)t * C + c]);
        wsum += w;
    }
    return acc / fmaxf(wsum, kWeightEps);
}

}  // namespace edgetok
