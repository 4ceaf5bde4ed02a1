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
// (f_backward(grad_out, x, options)); the recomputation is free next to the traffic.
//
// Conventions follow torch.nn.functional, including its choices at kinks and for NaN: relu's
// gradient at 0 is 0, hardsigmoid's gradient at +-3 is 0, NaN inputs give NaN outputs.
// erf is not in the dialect's math list, so the normal CDF is implemented here (nn_phi below).
#include <metal_stdlib>
#include "params.h"
using namespace metal;

// ---- erf / normal CDF ----------------------------------------------------------------------
// |x| < 1:  erf(x) = x + x * P(x^2), P of degree 6 fitted (near-minimax, on Chebyshev nodes) to
//           erf(x)/x - 1; fit error 1.4e-9 relative; with fma evaluation the float result is
//           within ~1.3 * 2^-24 relative of erf (checked against a float64 erf on 4e4 points).
// t >= 1:   erfc(t) = z * exp(-t^2 + S(z)), z = 1 / (1 + t/2) (the Numerical Recipes "erfcc"
//           form), S of degree 8 refitted on t in [1, 10]: fit error 3e-9. t^2 is split as
//           hi^2 + lo*(t + hi) with hi = t rounded to 12 significant bits (hi^2 exact in float),
//           so the large exponent does not lose the low bits: erfc is within 3.3e-7 relative of
//           the true value for every t whose erfc is a normal float, and erf = 1 - erfc is within
//           ~1 ulp of 1 absolute.
// (Abramowitz-Stegun 7.1.26 would be 1.5e-7 absolute and gives no relative accuracy in the tail.)
constant float ERF_P[7] = {1.283791661e-01f, -3.761262596e-01f, 1.128360033e-01f,
                           -2.685444802e-02f, 5.189541727e-03f, -8.020893438e-04f,
                           7.889279368e-05f};
constant float ERFC_S[9] = {-1.265498281e+00f, 9.996851087e-01f, 3.778168857e-01f,
                            7.167249918e-02f, -7.285854220e-02f, -6.603755802e-02f,
                            -4.496999681e-01f, 6.439123154e-01f, -2.402070165e-01f};

inline float nn_erf_small(float x) {  // |x| <= 1
    float s = x * x;
    float r = ERF_P[6];
    for (int i = 5; i >= 0; --i) r = fma(r, s, ERF_P[i]);
    return fma(x, r, x);
}

// erfc(t) for t >= 1 (any t > 0 works; the fit is for t >= 1), given t^2 = k w^2 with k = 1 or
// 1/2: the exponent is formed from w, split exactly, so nn_phi(x) = erfc(|x|/sqrt 2)/2 is not
// hurt by the rounding of x/sqrt 2 (which would cost 2 t^2 * 2^-24 relative).
inline float nn_erfc_large(float t, float w, float k) {
    float z = 1.0f / fma(0.5f, t, 1.0f);
    float s = ERFC_S[8];
    for (int i = 7; i >= 0; --i) s = fma(s, z, ERFC_S[i]);
    float hi = as_type<float>(as_type<uint>(w) & 0xfffff000u);
    float lo = w - hi;
    // k hi^2 is exact. exp(-k hi^2) underflows to 0 for huge w while the second factor stays
    // <= exp(s) < 1: no 0 * inf.
    return z * precise::exp(-k * hi * hi) * precise::exp(fma(-k * lo, w + hi, s));
}

// Phi(x) = (1 + erf(x / sqrt 2)) / 2, without the cancellation of 1 + erf in the left tail.
inline float nn_phi(float x) {
    float w = fabs(x);
    float u = w * M_SQRT1_2_F;
    if (u <= 1.0f) return 0.5f + 0.5f * nn_erf_small(x * M_SQRT1_2_F);
    float tail = 0.5f * nn_erfc_large(u, w, 0.5f);
    return x < 0.0f ? tail : 1.0f - tail;
}

// exp(x) - 1 and log(1 + x) accurate near 0 (Kahan's / Goldberg's tricks: the rounding error of
// u = exp(x) or 1 + x cancels in the ratio).
inline float nn_expm1(float x) {
    float u = precise::exp(x);
    if (u == 1.0f) return x;
    float um1 = u - 1.0f;
    if (um1 == -1.0f) return -1.0f;
    if (isinf(u)) return u;
    return um1 * x / precise::log(u);
}
inline float nn_log1p(float x) {
    float u = 1.0f + x;
    if (u == 1.0f) return x;
    if (isinf(u)) return u;
    return precise::log(u) * x / (u - 1.0f);
}

// clamp(v, 0, hi) that keeps NaN (Metal's min/max would drop it, torch keeps it).
inline float nn_clamp(float v, float hi) { return v <= 0.0f ? 0.0f : (v >= hi ? hi : v); }

// ---- the ops: fwd(x, p) and bwd(g, x, p) = g * f'(x); p.a, p.b are documented per op ------------
struct Relu {
    static float fwd(float x, NeuronParams p) { return x <= 0.0f ? 0.0f : x; }
    static float bwd(float g, float x, NeuronParams p) { return x <= 0.0f ? 0.0f : g; }
};
struct LeakyRelu {  // a = negative_slope
    static float fwd(float x, NeuronParams p) { return x > 0.0f ? x : x * p.a; }
    static float bwd(float g, float x, NeuronParams p) { return x > 0.0f ? g : g * p.a; }
};
struct Elu {  // a = alpha
    static float fwd(float x, NeuronParams p) { return x > 0.0f ? x : p.a * nn_expm1(x); }
    static float bwd(float g, float x, NeuronParams p) {
        return x <= 0.0f ? g * p.a * precise::exp(x) : g;
    }
};
struct Sigmoid {
    static float fwd(float x, NeuronParams p) { return 1.0f / (1.0f + precise::exp(-x)); }
    static float bwd(float g, float x, NeuronParams p) {
        float s = 1.0f / (1.0f + precise::exp(-x));
        return g * s * (1.0f - s);
    }
};
struct Tanh {
    static float fwd(float x, NeuronParams p) { return precise::tanh(x); }
    static float bwd(float g, float x, NeuronParams p) {
        float t = precise::tanh(x);
        return g * (1.0f - t * t);
    }
};
// softplus(x) = log(1 + exp(b x)) / b, = x where b x > threshold (torch's switch). Computed as
// max(bx, 0) + log1p(exp(-|bx|)), which never overflows; the gradient is sigmoid(bx).
struct Softplus {  // a = beta, b = threshold
    static float fwd(float x, NeuronParams p) {
        float z = x * p.a;
        if (z > p.b) return x;
        return (max(z, 0.0f) + nn_log1p(precise::exp(-fabs(z)))) / p.a;
    }
    static float bwd(float g, float x, NeuronParams p) {
        float z = x * p.a;
        if (z > p.b) return g;
        return g / (1.0f + precise::exp(-z));
    }
};
// gelu(x) = x Phi(x); gelu'(x) = Phi(x) + x phi(x), phi the standard normal density.
struct Gelu {
    static float fwd(float x, NeuronParams p) { return x * nn_phi(x); }
    static float bwd(float g, float x, NeuronParams p) {
        float pdf = precise::exp(-0.5f * x * x) * (0.5f * M_2_SQRTPI_F * M_SQRT1_2_F);
        float xpdf = pdf == 0.0f ? 0.0f : x * pdf;  // x = +-inf: 0, not inf * 0
        return g * (nn_phi(x) + xpdf);
    }
};
// approximate='tanh': 0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi), as torch.
struct GeluTanh {
    static float fwd(float x, NeuronParams p) {
        const float k = M_SQRT2_F * M_2_SQRTPI_F * 0.5f;
        float inner = k * (x + 0.044715f * x * x * x);
        return 0.5f * x * (1.0f + precise::tanh(inner));
    }
    static float bwd(float g, float x, NeuronParams p) {
        const float k = M_SQRT2_F * M_2_SQRTPI_F * 0.5f;
        float x2 = x * x;
        float th = precise::tanh(k * (x + 0.044715f * x2 * x));
        float dth = 1.0f - th * th;
        // dth == 0 where tanh saturated: the second term is 0 (not 0 * inf once x^2 overflows)
        float right = dth == 0.0f ? 0.0f : 0.5f * x * dth * k * (1.0f + 3.0f * 0.044715f * x2);
        return g * (0.5f * (1.0f + th) + right);
    }
};
// torch's hardsigmoid: relu6(x + 3) / 6, gradient 1/6 strictly inside (-3, 3).
struct HardsigmoidTorch {
    static float fwd(float x, NeuronParams p) { return nn_clamp(x + 3.0f, 6.0f) / 6.0f; }
    static float bwd(float g, float x, NeuronParams p) {
        return (x > -3.0f && x < 3.0f) ? g / 6.0f : 0.0f;
    }
};
// MPS's hard sigmoid: clamp(a x + b, 0, 1), gradient a strictly inside. fma: one rounding on
// every backend (a contracted a*x+b on one and not another would differ in the last bit).
struct HardSigmoidAB {
    static float fwd(float x, NeuronParams p) { return nn_clamp(fma(p.a, x, p.b), 1.0f); }
    static float bwd(float g, float x, NeuronParams p) {
        float v = fma(p.a, x, p.b);
        return (v > 0.0f && v < 1.0f) ? g * p.a : 0.0f;
    }
};
struct LinearNeuron {  // a x + b
    static float fwd(float x, NeuronParams p) { return fma(p.a, x, p.b); }
    static float bwd(float g, float x, NeuronParams p) { return g * p.a; }
};

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
