// optimizer.h -- what every optimizer update kernel shares: ours (optimizer.metal) and a user's
// (pymetalnn.optim.CustomOptimizer, which can `#include "optimizer.h"` since kernels/ is on the
// include path).
//
// An update kernel treats each thread as the owner of 4 consecutive elements [4 gid, 4 gid + 4):
// 4-wide loads (16 bytes of float, 8 of half) when the host says every buffer is 16-byte
// aligned (OptimParams.vec4) and the 4 are in range, scalar loads at the tail. That keeps each
// thread's loads few and wide, which is what an update bound by memory bandwidth needs.
//
// Weights are always updated in float32: a float tensor is its own master copy; a half tensor has
// a float32 master copy (state buffer `master`) that the rule updates, the half tensor receiving
// its rounding. The two overloads of optim_load_w4 / optim_store_w4 pick that by pointer type.
#pragma once
#include <metal_stdlib>
#include "params.h"
using namespace metal;

// Factor of clip-by-global-norm as torch.nn.utils.clip_grad_norm_ computes it; gnorm[0] holds
// the sum of squares of every rescaled gradient of the optimizer (optim_sumsq, this step).
inline float optim_clip_coef(const device float* gnorm, constant OptimParams& c) {
  if (c.clip_norm == 0u) return 1.0f;
  float norm = precise::sqrt(gnorm[0]);
  return min(c.max_norm / (norm + 1e-6f), 1.0f);
}

// The gradient the rule sees (MPS descriptor order: rescale, clip, then regularization; the
// norm clip sits with the rescale because it scales the whole gradient). maximize flips the
// sign before regularization so that L1/L2 keep pulling w towards 0, as torch's weight_decay
// does under maximize.
inline float optim_grad(float g, float w, float clip_coef, constant OptimParams& c) {
  g = g * c.grad_rescale * clip_coef;
  if (c.clip_value != 0u) g = clamp(g, c.clip_min, c.clip_max);
  if (c.maximize != 0u) g = -g;
  if (c.reg_type == 1u) {
    g += c.reg_scale * sign(w);
  } else if (c.reg_type == 2u) {
    g += c.reg_scale * w;
  }
  return g;
}

// Elements i0 .. i0 + 3 as float (0 past n); vec4: the buffer is 16-byte aligned at src.
template <typename T>
inline void optim_load4n(const device T* src, uint i0, uint n, uint vec4, thread float* out) {
  if (vec4 != 0u && i0 + 4u <= n) {
    vec<T, 4> v = *((const device vec<T, 4>*)(src + i0));
    out[0] = float(v.x);
    out[1] = float(v.y);
    out[2] = float(v.z);
    out[3] = float(v.w);
  } else {
    for (uint k = 0; k < 4u; ++k) out[k] = i0 + k < n ? float(src[i0 + k]) : 0.0f;
  }
}

// Stores elements i0 .. i0 + 3 that are < n (rounded to T).
template <typename T>
inline void optim_store4n(device T* dst, uint i0, uint n, uint vec4, thread const float* v) {
  if (vec4 != 0u && i0 + 4u <= n) {
    *((device vec<T, 4>*)(dst + i0)) = vec<T, 4>(T(v[0]), T(v[1]), T(v[2]), T(v[3]));
  } else {
    for (uint k = 0; k < 4u; ++k) {
      if (i0 + k < n) dst[i0 + k] = T(v[k]);
    }
  }
}

// The same with n and vec4 from the tensor's OptimParams.
template <typename T>
inline void optim_load4(const device T* src, uint i0, constant OptimParams& c, thread float* out) {
  optim_load4n(src, i0, c.n, c.vec4, out);
}
template <typename T>
inline void optim_store4(device T* dst, uint i0, constant OptimParams& c, thread const float* v) {
  optim_store4n(dst, i0, c.n, c.vec4, v);
}

// float32 weights: the tensor itself; float16 weights: the float32 master copy.
inline void optim_load_w4n(const device float* param, const device float* master, uint i0,
                           uint n, uint vec4, thread float* w) {
  optim_load4n(param, i0, n, vec4, w);
}
inline void optim_load_w4n(const device half* param, const device float* master, uint i0,
                           uint n, uint vec4, thread float* w) {
  optim_load4n(master, i0, n, vec4, w);
}
inline void optim_store_w4n(device float* param, device float* master, uint i0, uint n,
                            uint vec4, thread const float* w) {
  optim_store4n(param, i0, n, vec4, w);
}
inline void optim_store_w4n(device half* param, device float* master, uint i0, uint n,
                            uint vec4, thread const float* w) {
  optim_store4n(master, i0, n, vec4, w);
  optim_store4n(param, i0, n, vec4, w);
}
template <typename T>
inline void optim_load_w4(const device T* param, const device float* master, uint i0,
                          constant OptimParams& c, thread float* w) {
  optim_load_w4n(param, master, i0, c.n, c.vec4, w);
}
template <typename T>
inline void optim_store_w4(device T* param, device float* master, uint i0,
                           constant OptimParams& c, thread const float* w) {
  optim_store_w4n(param, master, i0, c.n, c.vec4, w);
}
