// stream_variants.metal -- numbered launch shapes of the memory-bound element-wise kernels
// (kernels/stream.h), timed against each other by benchmarks/dev_stream.py on relu forward
// (1 read, 1 write) and relu backward (2 reads, 1 write), float and half:
//   v1  HEAD before stream.h: thread gid does the adjacent vec<T, 4> pair 2 gid, 2 gid + 1
//       (32 bytes of float, 16 of half per stream; half loads 8 bytes), then one thread per tail
//       element
//   v2  one coalesced 16-byte chunk per thread (STREAM_U = 1)
//   v3  two coalesced 16-byte chunks per thread (STREAM_U = 2: production)
//   v4  four coalesced 16-byte chunks per thread (STREAM_U = 4)
//   v5  grid-stride: a fixed grid (host: 2048 threads per SM) loops over 16-byte chunks
// Chunks are W = 16 / sizeof(T) elements; params: NeuronParams (n, nvec = chunks).
#include <metal_stdlib>
#include "params.h"
#include "instantiate.h"
#include "neuron.h"
#include "stream.h"
using namespace metal;

template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void relu_v1(device const T* x [[buffer(0)]], device T* y [[buffer(1)]],
                    constant NeuronParams& p [[buffer(2)]],
                    uint gid [[thread_position_in_grid]]) {
    const uint nvec = p.nvec;  // here: 8-element pairs
    if (gid < nvec) {
        device const vec<T, 4>* xv = (device const vec<T, 4>*)x;
        device vec<T, 4>* yv = (device vec<T, 4>*)y;
        vec<T, 4> a = xv[2u * gid], b = xv[2u * gid + 1u], ra, rb;
        for (int k = 0; k < 4; ++k) {
            ra[k] = T(Relu::fwd(float(a[k]), p));
            rb[k] = T(Relu::fwd(float(b[k]), p));
        }
        yv[2u * gid] = ra;
        yv[2u * gid + 1u] = rb;
    } else {
        const uint i = nvec * 8u + (gid - nvec);
        if (i < p.n) y[i] = T(Relu::fwd(float(x[i]), p));
    }
}

template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void relu_bwd_v1(device const T* g [[buffer(0)]], device const T* x [[buffer(1)]],
                        device T* dx [[buffer(2)]], constant NeuronParams& p [[buffer(3)]],
                        uint gid [[thread_position_in_grid]]) {
    const uint nvec = p.nvec;
    if (gid < nvec) {
        device const vec<T, 4>* gv = (device const vec<T, 4>*)g;
        device const vec<T, 4>* xv = (device const vec<T, 4>*)x;
        device vec<T, 4>* dv = (device vec<T, 4>*)dx;
        vec<T, 4> ga = gv[2u * gid], gb = gv[2u * gid + 1u];
        vec<T, 4> xa = xv[2u * gid], xb = xv[2u * gid + 1u], ra, rb;
        for (int k = 0; k < 4; ++k) {
            ra[k] = T(Relu::bwd(float(ga[k]), float(xa[k]), p));
            rb[k] = T(Relu::bwd(float(gb[k]), float(xb[k]), p));
        }
        dv[2u * gid] = ra;
        dv[2u * gid + 1u] = rb;
    } else {
        const uint i = nvec * 8u + (gid - nvec);
        if (i < p.n) dx[i] = T(Relu::bwd(float(g[i]), float(x[i]), p));
    }
}

// U coalesced chunks per thread (loads from clamped indices, stores guarded), then the tail.
template <typename T, int U>
[[max_total_threads_per_threadgroup(256)]]
kernel void relu_u(device const T* x [[buffer(0)]], device T* y [[buffer(1)]],
                   constant NeuronParams& p [[buffer(2)]],
                   uint gid [[thread_position_in_grid]],
                   uint tgid [[threadgroup_position_in_grid]],
                   uint lid [[thread_position_in_threadgroup]],
                   uint tgs [[threads_per_threadgroup]]) {
    const uint nvec = p.nvec;
    const uint vthreads = (nvec + uint(U) * tgs - 1u) / (uint(U) * tgs) * tgs;
    if (gid < vthreads) {
        float v[U][16 / sizeof(T)];
        for (int u = 0; u < U; ++u) {
            stream_load<16 / sizeof(T)>(x, min((tgid * uint(U) + uint(u)) * tgs + lid, nvec - 1u), v[u]);
        }
        for (int u = 0; u < U; ++u) {
            for (int e = 0; e < int(16 / sizeof(T)); ++e) v[u][e] = Relu::fwd(v[u][e], p);
        }
        for (int u = 0; u < U; ++u) {
            const uint c = (tgid * uint(U) + uint(u)) * tgs + lid;
            if (c < nvec) stream_store<16 / sizeof(T)>(y, c, v[u]);
        }
    } else {
        const uint i = nvec * uint(16 / sizeof(T)) + (gid - vthreads);
        if (i < p.n) y[i] = T(Relu::fwd(float(x[i]), p));
    }
}

template <typename T, int U>
[[max_total_threads_per_threadgroup(256)]]
kernel void relu_bwd_u(device const T* g [[buffer(0)]], device const T* x [[buffer(1)]],
                       device T* dx [[buffer(2)]], constant NeuronParams& p [[buffer(3)]],
                       uint gid [[thread_position_in_grid]],
                       uint tgid [[threadgroup_position_in_grid]],
                       uint lid [[thread_position_in_threadgroup]],
                       uint tgs [[threads_per_threadgroup]]) {
    const uint nvec = p.nvec;
    const uint vthreads = (nvec + uint(U) * tgs - 1u) / (uint(U) * tgs) * tgs;
    if (gid < vthreads) {
        float gv[U][16 / sizeof(T)], xv[U][16 / sizeof(T)];
        for (int u = 0; u < U; ++u) {
            const uint c = min((tgid * uint(U) + uint(u)) * tgs + lid, nvec - 1u);
            stream_load<16 / sizeof(T)>(g, c, gv[u]);
            stream_load<16 / sizeof(T)>(x, c, xv[u]);
        }
        for (int u = 0; u < U; ++u) {
            for (int e = 0; e < int(16 / sizeof(T)); ++e) gv[u][e] = Relu::bwd(gv[u][e], xv[u][e], p);
        }
        for (int u = 0; u < U; ++u) {
            const uint c = (tgid * uint(U) + uint(u)) * tgs + lid;
            if (c < nvec) stream_store<16 / sizeof(T)>(dx, c, gv[u]);
        }
    } else {
        const uint i = nvec * uint(16 / sizeof(T)) + (gid - vthreads);
        if (i < p.n) dx[i] = T(Relu::bwd(float(g[i]), float(x[i]), p));
    }
}

// grid-stride over chunks, then the tail by the same loop
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void relu_gs(device const T* x [[buffer(0)]], device T* y [[buffer(1)]],
                    constant NeuronParams& p [[buffer(2)]],
                    uint gid [[thread_position_in_grid]],
                    uint tgs [[threads_per_threadgroup]],
                    uint n_groups [[threadgroups_per_grid]]) {
    const uint grid = tgs * n_groups;
    for (uint c = gid; c < p.nvec; c += grid) {
        float v[16 / sizeof(T)];
        stream_load<16 / sizeof(T)>(x, c, v);
        for (int e = 0; e < int(16 / sizeof(T)); ++e) v[e] = Relu::fwd(v[e], p);
        stream_store<16 / sizeof(T)>(y, c, v);
    }
    for (uint i = p.nvec * uint(16 / sizeof(T)) + gid; i < p.n; i += grid) y[i] = T(Relu::fwd(float(x[i]), p));
}

template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void relu_bwd_gs(device const T* g [[buffer(0)]], device const T* x [[buffer(1)]],
                        device T* dx [[buffer(2)]], constant NeuronParams& p [[buffer(3)]],
                        uint gid [[thread_position_in_grid]],
                        uint tgs [[threads_per_threadgroup]],
                        uint n_groups [[threadgroups_per_grid]]) {
    const uint grid = tgs * n_groups;
    for (uint c = gid; c < p.nvec; c += grid) {
        float gv[16 / sizeof(T)], xv[16 / sizeof(T)];
        stream_load<16 / sizeof(T)>(g, c, gv);
        stream_load<16 / sizeof(T)>(x, c, xv);
        for (int e = 0; e < int(16 / sizeof(T)); ++e) gv[e] = Relu::bwd(gv[e], xv[e], p);
        stream_store<16 / sizeof(T)>(dx, c, gv);
    }
    for (uint i = p.nvec * uint(16 / sizeof(T)) + gid; i < p.n; i += grid) {
        dx[i] = T(Relu::bwd(float(g[i]), float(x[i]), p));
    }
}

#define STREAM_VARIANTS(T)                                                                      \
    INSTANTIATE("relu_fwd_v1_" #T, relu_v1, T)                                                  \
    INSTANTIATE("relu_bwd_v1_" #T, relu_bwd_v1, T)                                              \
    INSTANTIATE("relu_fwd_v2_" #T, relu_u, T, 1)                                                \
    INSTANTIATE("relu_bwd_v2_" #T, relu_bwd_u, T, 1)                                            \
    INSTANTIATE("relu_fwd_v3_" #T, relu_u, T, 2)                                                \
    INSTANTIATE("relu_bwd_v3_" #T, relu_bwd_u, T, 2)                                            \
    INSTANTIATE("relu_fwd_v4_" #T, relu_u, T, 4)                                                \
    INSTANTIATE("relu_bwd_v4_" #T, relu_bwd_u, T, 4)                                            \
    INSTANTIATE("relu_fwd_v5_" #T, relu_gs, T)                                                  \
    INSTANTIATE("relu_bwd_v5_" #T, relu_bwd_gs, T)

STREAM_VARIANTS(float)
STREAM_VARIANTS(half)
