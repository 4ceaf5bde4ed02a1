// embedding.metal -- table lookup (torch.nn.functional.embedding) and its weight gradient.
//
// Design. Forward: one thread per output element y[i, j] = weight[idx[i], j]; consecutive
// threads read consecutive columns of a row, so each lookup is a coalesced row copy.
// Backward without float atomics (deterministic, like every reduction here): the host sorts the
// indices (it reads them anyway to range-check them before dispatch) into perm, grouped into one
// segment per distinct row; one thread per (segment, column) adds dy[perm[k], j] over its
// segment in index order and writes that row of the gradient; rows never indexed (and the
// padding row) are written 0. scale_grad_by_freq divides by the segment length.
// max_norm (torch's embedding_renorm_, in place before the lookup): one thread per distinct
// indexed row (the host has them from its range check) takes the row's p-norm and, where it
// exceeds max_norm, scales the row by max_norm / (norm + 1e-7), as torch.
// Storage float or half; sums in float.
#include <metal_stdlib>
#include "params.h"
#include "instantiate.h"
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

template <typename T>
kernel void embedding_renorm(device const int* rows [[buffer(0)]],
                             device T* weight [[buffer(1)]],
                             constant EmbeddingParams& p [[buffer(2)]],
                             uint gid [[thread_position_in_grid]]) {
    if (gid >= p.n) return;
    device T* w = weight + uint(rows[gid]) * p.D;
    float acc = 0.0f;
    for (uint j = 0; j < p.D; ++j) {
        float a = fabs(float(w[j]));
        if (isinf(p.norm_type)) acc = max(acc, a);
        else if (p.norm_type == 1.0f) acc += a;
        else if (p.norm_type == 2.0f) acc += a * a;
        else acc += pow(a, p.norm_type);
    }
    float norm = isinf(p.norm_type) || p.norm_type == 1.0f ? acc
               : p.norm_type == 2.0f ? sqrt(acc) : pow(acc, 1.0f / p.norm_type);
    if (norm > p.max_norm) {
        float s = p.max_norm / (norm + 1e-7f);
        for (uint j = 0; j < p.D; ++j) w[j] = T(float(w[j]) * s);
    }
}

#define EMBEDDING_INSTANTIATE(T)                                                               \
    INSTANTIATE("embedding_fwd_" #T, embedding_fwd, T)                                         \
    INSTANTIATE("embedding_bwd_" #T, embedding_bwd, T)                                         \
    INSTANTIATE("embedding_renorm_" #T, embedding_renorm, T)

EMBEDDING_INSTANTIATE(float)
EMBEDDING_INSTANTIATE(half)
