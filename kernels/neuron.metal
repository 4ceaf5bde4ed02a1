// neuron.metal -- element-wise activations ("neurons" in MPS's words) and their gradients.
//
// Design: every op is a small struct with a scalar float `fwd(x)` and `bwd(g, x)`; two kernel
// templates (forward, backward) apply it, instantiated per op and storage type. The work is purely
// memory-bound (one or two reads and one write per element, a handful of flops), so the kernels
// are shaped for bandwidth only: each thread moves two 4-vectors (32 bytes of float or 16 of half
// per stream) with aligned vector loads, and the last n % 8 elements are done by one extra thread
// each (all elements, when a tensor is a view at an unaligned offset). Storage may be half;
// arithmetic is always float (half values are widened on load and rounded once on store).
// Backward recomputes from x rather than from the forward's output so the API is uniform
// (f_backward(grad_out, x, options)); the recomputation is free next to the traffic. relu, leaky
// relu, sigmoid and tanh also have <op>_bwdy kernels taking the output y instead of x (the
// gradient of conv2d / linear / batch_norm with a fused activation=, which keep only y).
// The scalar ops themselves (and torch's conventions at kinks and for NaN) are in neuron.h.
#include <metal_stdlib>
#include "params.h"
#include "neuron.h"
using namespace metal;

// ---- kernels -------------------------------------------------------------------------------
// Thread gid < nvec does elements [8 gid, 8 gid + 8) with two 4-vector loads per stream; thread
// nvec + j does element 8 nvec + j, for j < n - 8 nvec. Launch count: n - 7 nvec. The host sets
// nvec = n / 8 when every buffer is 4-vector aligned (always, unless a tensor is a view at an odd
// offset), else 0.
template <typename T, typename Op>
[[max_total_threads_per_threadgroup(256)]]
kernel void neuron_fwd(device const T* x [[buffer(0)]],
                       device T* y [[buffer(1)]],
                       constant NeuronParams& p [[buffer(2)]],
                       uint gid [[thread_position_in_grid]]) {
    NeuronParams q = p;
    uint nvec = q.nvec;
    if (gid < nvec) {
        device const vec<T, 4>* xv = (device const vec<T, 4>*)x;
        device vec<T, 4>* yv = (device vec<T, 4>*)y;
        vec<T, 4> a = xv[2u * gid];
        vec<T, 4> b = xv[2u * gid + 1u];
        vec<T, 4> ra, rb;
        for (int k = 0; k < 4; ++k) {
            ra[k] = T(Op::fwd(float(a[k]), q));
            rb[k] = T(Op::fwd(float(b[k]), q));
        }
        yv[2u * gid] = ra;
        yv[2u * gid + 1u] = rb;
    } else {
        uint i = nvec * 8u + (gid - nvec);
        if (i < q.n) y[i] = T(Op::fwd(float(x[i]), q));
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
    uint nvec = q.nvec;
    if (gid < nvec) {
        device const vec<T, 4>* gv = (device const vec<T, 4>*)g;
        device const vec<T, 4>* xv = (device const vec<T, 4>*)x;
        device vec<T, 4>* dv = (device vec<T, 4>*)dx;
        vec<T, 4> ga = gv[2u * gid], gb = gv[2u * gid + 1u];
        vec<T, 4> xa = xv[2u * gid], xb = xv[2u * gid + 1u];
        vec<T, 4> ra, rb;
        for (int k = 0; k < 4; ++k) {
            ra[k] = T(Op::bwd(float(ga[k]), float(xa[k]), q));
            rb[k] = T(Op::bwd(float(gb[k]), float(xb[k]), q));
        }
        dv[2u * gid] = ra;
        dv[2u * gid + 1u] = rb;
    } else {
        uint i = nvec * 8u + (gid - nvec);
        if (i < q.n) dx[i] = T(Op::bwd(float(g[i]), float(x[i]), q));
    }
}

// Host names <op>_<fwd|bwd>[_variant]_<dtype>; VARIANT is empty or "_tanh".
#define NEURON_INSTANTIATE(name, VARIANT, Op, T)                                               \
    template [[host_name(#name "_fwd" VARIANT "_" #T)]] [[kernel]]                             \
        decltype(neuron_fwd<T, Op>) neuron_fwd<T, Op>;                                         \
    template [[host_name(#name "_bwd" VARIANT "_" #T)]] [[kernel]]                             \
        decltype(neuron_bwd<T, Op>) neuron_bwd<T, Op>;
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
    template [[host_name(#name "_bwdy_" #T)]] [[kernel]]                                       \
        decltype(neuron_bwd<T, Op>) neuron_bwd<T, Op>;
#define NEURON_INSTANTIATE_Y_ALL(T)                                 \
    NEURON_INSTANTIATE_Y(relu, ReluFromOutput, T)                   \
    NEURON_INSTANTIATE_Y(leaky_relu, LeakyReluFromOutput, T)        \
    NEURON_INSTANTIATE_Y(sigmoid, SigmoidFromOutput, T)             \
    NEURON_INSTANTIATE_Y(tanh, TanhFromOutput, T)
NEURON_INSTANTIATE_Y_ALL(float)
NEURON_INSTANTIATE_Y_ALL(half)
