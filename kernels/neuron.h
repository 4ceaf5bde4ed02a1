// neuron.h -- the scalar activation functions ("neurons") and their derivatives, written once
// and shared by neuron.metal (the element-wise kernels) and by the fused epilogues of conv.metal,
// gemm.metal and norm.metal (conv2d / linear / batch_norm with activation=).
//
// Every op is a struct with a scalar float `fwd(x, p)` and `bwd(g, x, p)` = g * f'(x), p.a / p.b
// its scalars (NeuronParams). Ops whose derivative is a function of the output y = f(x) (relu,
// leaky relu with slope >= 0, sigmoid, tanh) also have a `<Op>FromOutput::bwd(g, y, p)`: the
// gradient of a fused forward, which keeps only y. nn_activation(v, act, alpha) applies the
// NN_ACT_* op selected at run time (a uniform branch per output element: free next to the
// memory traffic or the FMAs of the producing kernel).
//
// Conventions follow torch.nn.functional, including its choices at kinks and for NaN: relu's
// gradient at 0 is 0, hardsigmoid's gradient at +-3 is 0, NaN inputs give NaN outputs.
// erf is not in the dialect's math list, so the normal CDF is implemented here (nn_phi below).
#pragma once
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
// The special cases are selects over the general formula, not early returns: the same values
// (the general formula's result in those cases is discarded), and no branch per element on cpu.
inline float nn_expm1(float x) {
    const float u = precise::exp(x), um1 = u - 1.0f;
    float r = um1 * x / precise::log(u);
    r = isinf(u) ? u : r;
    r = um1 == -1.0f ? -1.0f : r;
    return u == 1.0f ? x : r;
}
inline float nn_log1p(float x) {
    const float u = 1.0f + x;
    float r = precise::log(u) * x / (u - 1.0f);
    r = isinf(u) ? u : r;
    return u == 1.0f ? x : r;
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
        // selects (as nn_log1p); z > 0 ? z : 0 is max(z, 0) here, NaN included (0 both ways)
        const float z = x * p.a;
        const float r = ((z > 0.0f ? z : 0.0f) + nn_log1p(precise::exp(-fabs(z)))) / p.a;
        return z > p.b ? x : r;
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

// ---- gradients from the output y = f(x) (the fused forward keeps only y) ---------------------
// relu: y > 0 iff x > 0. leaky relu (slope a >= 0): y > 0 iff x > 0 (a = 0: y = 0 either way).
// sigmoid: s' = y (1 - y). tanh: 1 - y^2.
struct ReluFromOutput {
    static float bwd(float g, float y, NeuronParams p) { return y > 0.0f ? g : 0.0f; }
};
struct LeakyReluFromOutput {  // a = negative_slope >= 0
    static float bwd(float g, float y, NeuronParams p) { return y > 0.0f ? g : g * p.a; }
};
struct SigmoidFromOutput {
    static float bwd(float g, float y, NeuronParams p) { return g * y * (1.0f - y); }
};
struct TanhFromOutput {
    static float bwd(float g, float y, NeuronParams p) { return g * (1.0f - y * y); }
};

// ---- fused epilogues: the activation selected at run time (params field `act`, `act_alpha`) ----
// Codes NN_ACT_* in params.h (pymetalnn/ops/neuron.py's ACTIVATIONS reads them from there).

inline float nn_activation(float v, uint act, float alpha) {
    NeuronParams q = {0u, 0u, alpha, 0.0f};
    if (act == NN_ACT_RELU) return Relu::fwd(v, q);
    if (act == NN_ACT_LEAKY_RELU) return LeakyRelu::fwd(v, q);
    if (act == NN_ACT_SIGMOID) return Sigmoid::fwd(v, q);
    if (act == NN_ACT_TANH) return Tanh::fwd(v, q);
    return v;
}

// g * act'(v) from the pre-activation v: for a fused backward that recomputes v itself
// (batch_norm_backward(..., activation=)); the same conventions as the ops' bwd (relu'(0) = 0,
// leaky_relu'(0) = slope, any slope sign).
inline float nn_activation_bwd(float g, float v, uint act, float alpha) {
    NeuronParams q = {0u, 0u, alpha, 0.0f};
    if (act == NN_ACT_RELU) return Relu::bwd(g, v, q);
    if (act == NN_ACT_LEAKY_RELU) return LeakyRelu::bwd(g, v, q);
    if (act == NN_ACT_SIGMOID) return Sigmoid::bwd(g, v, q);
    if (act == NN_ACT_TANH) return Tanh::bwd(g, v, q);
    return g;
}
