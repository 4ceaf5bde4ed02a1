// neuron.metal -- element-wise activations ("neurons" in MPS's words) and their gradients.
//
// Design: every op is a small struct with a scalar float `fwd(x)` and `bwd(g, x)`; two kernel
// templates (forward, backward) apply it, instantiated per op and storage type. The work is purely
// memory-bound (one or two reads and one write per element, a handful of flops), so the kernels
// are shaped for bandwidth only (stream.h): each thread moves two coalesced 16-byte chunks per
// stream (4 floats or 8 halfs each), and the last n % W elements are done by one extra thread
// each (all elements, when a tensor is a view at an offset that is not 16-byte aligned).
// Storage may be half; arithmetic is always float (half values are widened on load and rounded
// once on store).
// Backward recomputes from x rather than from the forward's output so the API is uniform
// (f_backward(grad_out, x, options)); the recomputation is free next to the traffic. relu, leaky
// relu, sigmoid and tanh also have <op>_bwdy kernels taking the output y instead of x (the
// gradient of conv2d / linear / batch_norm with a fused activation=, which keep only y).
// The scalar ops themselves (and torch's conventions at kinks and for NaN) are in neuron.h.
#include <metal_stdlib>
#include "params.h"
#include "instantiate.h"
#include "neuron.h"
#include "stream.h"
using namespace metal;

// ---- kernels -------------------------------------------------------------------------------
// The stream.h shape: thread gid < vthreads does STREAM_U coalesced chunks of W = 16 / sizeof(T)
// elements (16-byte loads and stores, half included), loading every chunk (stream_clamp) before
// computing; the
// other threads do one tail element each (all elements, when a tensor is a view at an offset
// that is not 16-byte aligned: the host then sets nvec = 0). Launch count: stream_count in
// pymetalnn/ops/_common.py.
// Element i of an (N, inner) tensor whose images lie nstride apart (0: contiguous): channel
// slices of a larger NCHW tensor (the graph's concat elimination). The host sets nvec = 0 then.
inline uint nn_strided(uint i, uint inner, uint nstride) {
    return nstride == 0u ? i : (i / inner) * nstride + i % inner;
}

template <typename T, typename Op>
[[max_total_threads_per_threadgroup(256)]]
kernel void neuron_fwd(device const T* x [[buffer(0)]],
                       device T* y [[buffer(1)]],
                       constant NeuronParams& p [[buffer(2)]],
                       uint gid [[thread_position_in_grid]]) {
    NeuronParams q = p;
    const uint nvec = q.nvec;
    const uint vthreads = stream_vthreads(nvec);
    if (gid < vthreads) {
        const uint W = 16 / sizeof(T), c0 = stream_chunk(gid, 0u), c1 = stream_chunk(gid, 1u);
        // both chunks in one array, one loop over their 2 W elements: on cpu one vector loop of
        // 8 lanes where two of 4 were (tanh over 1M floats on one worker 3.5 -> 1.9-2.8 ns)
        float v[2 * (16 / sizeof(T))];
        stream_load<16 / sizeof(T)>(x, stream_clamp(c0, nvec), v);
        stream_load<16 / sizeof(T)>(x, stream_clamp(c1, nvec), v + W);
#pragma clang loop vectorize(enable)  // independent elements; see docs/dialect.md
        for (uint k = 0; k < 2u * W; ++k) v[k] = Op::fwd(v[k], q);
        if (c0 < nvec) stream_store<16 / sizeof(T)>(y, c0, v);
        if (c1 < nvec) stream_store<16 / sizeof(T)>(y, c1, v + W);
    } else {
        const uint i = nvec * uint(16 / sizeof(T)) + (gid - vthreads);
        if (i < q.n) y[nn_strided(i, q.inner, q.y_nstride)] = T(Op::fwd(float(x[i]), q));
    }
}

template <typename T, typename Op>
[[max_total_threads_per_threadgroup(256)]]
kernel void neuron_bwd(device const T* g [[buffer(0)]],
                       device const T* x [[buffer(1)]],
                       device T* dx [[buffer(2)]],
                       constant NeuronParams& p [[buffer(3)]],
                       uint gid [[thread_position_in_grid]]) {
    NeuronParams q = p;
    const uint nvec = q.nvec;
    const uint vthreads = stream_vthreads(nvec);
    if (gid < vthreads) {
        const uint W = 16 / sizeof(T), c0 = stream_chunk(gid, 0u), c1 = stream_chunk(gid, 1u);
        float gv[2 * (16 / sizeof(T))], xv[2 * (16 / sizeof(T))];  // as neuron_fwd's v
        const uint l0 = stream_clamp(c0, nvec), l1 = stream_clamp(c1, nvec);
        stream_load<16 / sizeof(T)>(g, l0, gv);
        stream_load<16 / sizeof(T)>(x, l0, xv);
        stream_load<16 / sizeof(T)>(g, l1, gv + W);
        stream_load<16 / sizeof(T)>(x, l1, xv + W);
#pragma clang loop vectorize(enable)  // independent elements; see docs/dialect.md
        for (uint k = 0; k < 2u * W; ++k) gv[k] = Op::bwd(gv[k], xv[k], q);
        if (c0 < nvec) stream_store<16 / sizeof(T)>(dx, c0, gv);
        if (c1 < nvec) stream_store<16 / sizeof(T)>(dx, c1, gv + W);
    } else {
        const uint i = nvec * uint(16 / sizeof(T)) + (gid - vthreads);
        if (i < q.n) dx[i] = T(Op::bwd(float(g[i]), float(x[nn_strided(i, q.inner, q.x_nstride)]), q));
    }
}

// Host names <op>_<fwd|bwd>[_variant]_<dtype>; VARIANT is empty or "_tanh".
#define NEURON_INSTANTIATE(name, VARIANT, Op, T)                                               \
    INSTANTIATE(#name "_fwd" VARIANT "_" #T, neuron_fwd, T, Op)                                \
    INSTANTIATE(#name "_bwd" VARIANT "_" #T, neuron_bwd, T, Op)
#define NEURON_INSTANTIATE_ALL(T)                              \
    NEURON_INSTANTIATE(relu, "", Relu, T)                      \
    NEURON_INSTANTIATE(leaky_relu, "", LeakyRelu, T)           \
    NEURON_INSTANTIATE(elu, "", Elu, T)                        \
    NEURON_INSTANTIATE(sigmoid, "", Sigmoid, T)                \
    NEURON_INSTANTIATE(tanh, "", Tanh, T)                      \
    NEURON_INSTANTIATE(softplus, "", Softplus, T)              \
    NEURON_INSTANTIATE(gelu, "", Gelu, T)                      \
    NEURON_INSTANTIATE(gelu, "_tanh", GeluTanh, T)             \
    NEURON_INSTANTIATE(hardsigmoid, "", HardsigmoidTorch, T)   \
    NEURON_INSTANTIATE(hard_sigmoid, "", HardSigmoidAB, T)     \
    NEURON_INSTANTIATE(linear_neuron, "", LinearNeuron, T)

NEURON_INSTANTIATE_ALL(float)
NEURON_INSTANTIATE_ALL(half)

// Gradients from the output: <op>_bwdy_<dtype>(g, y, dx, p), the same kernel with y for x.
#define NEURON_INSTANTIATE_Y(name, Op, T)                                                      \
    INSTANTIATE(#name "_bwdy_" #T, neuron_bwd, T, Op)
#define NEURON_INSTANTIATE_Y_ALL(T)                                 \
    NEURON_INSTANTIATE_Y(relu, ReluFromOutput, T)                   \
    NEURON_INSTANTIATE_Y(leaky_relu, LeakyReluFromOutput, T)        \
    NEURON_INSTANTIATE_Y(sigmoid, SigmoidFromOutput, T)             \
    NEURON_INSTANTIATE_Y(tanh, TanhFromOutput, T)
NEURON_INSTANTIATE_Y_ALL(float)
NEURON_INSTANTIATE_Y_ALL(half)
