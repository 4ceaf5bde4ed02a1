// embedding.metal -- table lookup (torch.nn.functional.embedding) and its weight gradient.
//
// Design. Forward: one thread per output element y[i, j] = weight[idx[i], j]; consecutive
// threads read consecutive columns of a row, so each lookup is a coalesced row copy.
// Backward without float atomics (deterministic, like every reduction here): the host sorts the
// indices (it reads them anyway to range-check them before dispatch) into perm, grouped into one
// segment per distinct row; one thread per (segment, column) adds dy[perm[k], j] over its
// segment in index order and writes that row of the gradient; rows never indexed (and the
// padding row) are written 0. scale_grad_by_freq divides by the segment length.
// Storage float or half; sums in float.
#include <metal_stdlib>
#include "params.h"
using namespace metal;

template <typename T>
kernel void embedding_fwd(device const int* idx [[buffer(0)]],
                          device const T* weight [[buffer(1)]],
                          device T* y [[buffer(2)]],
                          constant EmbeddingParams& p [[buffer(3)]],
                          uint gid [[thread_position_in_grid]]) {
    if (gid >= p.n * p.D) return;
    uint i = gid / p.D, j = gid % p.D;
    y[gid] = weight[uint(idx[i]) * p.D + j];
}

// One thread per element of the gradient table: row v sums its segment rowseg[v] of perm (in
// index order) or writes 0 when no index (or only the padding index) points at it, so the result
// never depends on a zero fill (a graph's planned buffers are not filled).
template <typename T>
kernel void embedding_bwd(device const T* dy [[buffer(0)]],
                          device const int* perm [[buffer(1)]],
                          device const int* seg [[buffer(2)]],
                          device const int* rowseg [[buffer(3)]],
                          device T* dw [[buffer(4)]],
                          constant EmbeddingParams& p [[buffer(5)]],
                          uint gid [[thread_position_in_grid]]) {
    if (gid >= p.V * p.D) return;
    uint v = gid / p.D, j = gid % p.D;
    int s = rowseg[v];
    float acc = 0.0f;
    if (s >= 0) {
        int lo = seg[s], hi = seg[s + 1];
        for (int k = lo; k < hi; ++k) acc += float(dy[uint(perm[k]) * p.D + j]);
        if (p.scale_by_freq) acc /= float(hi - lo);
    }
    dw[gid] = T(acc);
}

#define EMBEDDING_INSTANTIATE(T)                                                               \
    template [[host_name("embedding_fwd_" #T)]] [[kernel]] decltype(embedding_fwd<T>)          \
        embedding_fwd<T>;                                                                      \
    template [[host_name("embedding_bwd_" #T)]] [[kernel]] decltype(embedding_bwd<T>)          \
        embedding_bwd<T>;

EMBEDDING_INSTANTIATE(float)
EMBEDDING_INSTANTIATE(half)
