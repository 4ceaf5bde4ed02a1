// optimizer.metal -- fused optimizer updates (pymetalnn.optim): SGD, Adam/AdamW, RMSProp, and the
// gradient-norm reduction behind clip-by-global-norm.
//
// Design. An optimizer step is bound by memory bandwidth (Adam: 16 bytes read and 12 written
// per float32 weight, a few flops), so each rule is ONE elementwise kernel that reads a weight,
// its gradient and its state once and writes weight and state back in place; every step-dependent
// scalar (bias corrections, 1 - beta, AdamW's decay factor) is computed on the host in double
// and arrives in the params struct, so the kernel does only per-element work. Each thread owns 4
// consecutive elements with 4-wide loads (optimizer.h). The arithmetic follows torch.optim's
// single-tensor implementation operation by operation, so trajectories agree to float32
// rounding.
//
// Argument layout (CustomOptimizer kernels use the same):
//   0 param (T), 1 grad (T), 2 master (float32 copy of a half param; the param itself for
//   float), 3 .. 2+k state buffers (float32, k fixed per rule; unused ones get a dummy),
//   3+k gnorm (float, the sum of squares for clip-by-norm), 4+k OptimParams, 5+k the rule's
//   struct. Launched with ceil(n / 4) threads.
//
// Clip by global norm needs the norm of ALL gradients before any update: optim_zero clears
// gnorm, optim_sumsq (one launch per gradient) adds each tensor's sum of squares into it with a
// two-level reduction (simd_sum, then the threadgroup's partials, then one atomic per
// threadgroup, with a grid-stride loop so the atomics stay few), and the update kernels read
// gnorm[0] themselves: no host round trip.
#include <metal_stdlib>
#include "optimizer.h"
using namespace metal;

// Each rule's work on the 4 elements [i0, i0 + 4) of one tensor (n elements; vec4: 4-wide
// loads allowed) is one inline function, called by the per-tensor kernel (<rule>_step_<T>) and by
// the multi-tensor kernel (<rule>_step_multi_<T>), so the two paths run the same arithmetic.

// ---- SGD: torch.optim.SGD (momentum, dampening, nesterov, weight_decay, maximize) ----------
template <typename T>
inline void sgd_block(device T* param, const device T* grad, device float* master,
                      device float* momentum_buffer, uint i0, uint n, uint vec4, float coef,
                      constant OptimParams& c, constant SGDParams& h) {
  bool use_buf = h.momentum != 0.0f;
  float w[4], g[4], b[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  optim_load_w4n(param, master, i0, n, vec4, w);
  optim_load4n(grad, i0, n, vec4, g);
  if (use_buf && h.first_step == 0u) optim_load4n(momentum_buffer, i0, n, vec4, b);
  for (uint k = 0; k < 4u; ++k) {
    float gk = optim_grad(g[k], w[k], coef, c);
    if (h.weight_decay != 0.0f) gk = gk + h.weight_decay * w[k];
    if (use_buf) {
      b[k] = h.first_step != 0u ? gk : b[k] * h.momentum + h.one_minus_dampening * gk;
      gk = h.nesterov != 0u ? gk + h.momentum * b[k] : b[k];
    }
    w[k] = w[k] - c.lr * gk;
  }
  optim_store_w4n(param, master, i0, n, vec4, w);
  if (use_buf) optim_store4n(momentum_buffer, i0, n, vec4, b);
}

template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void sgd_step(device T* param [[buffer(0)]], const device T* grad [[buffer(1)]],
                     device float* master [[buffer(2)]],
                     device float* momentum_buffer [[buffer(3)]],
                     const device float* gnorm [[buffer(4)]],
                     constant OptimParams& c [[buffer(5)]], constant SGDParams& h [[buffer(6)]],
                     uint gid [[thread_position_in_grid]]) {
  uint i0 = gid * 4u;
  if (i0 >= c.n) return;
  sgd_block(param, grad, master, momentum_buffer, i0, c.n, c.vec4, optim_clip_coef(gnorm, c), c,
            h);
}

// ---- Adam / AdamW: torch.optim.Adam, torch.optim.AdamW (amsgrad, maximize) ----------------
template <typename T>
inline void adam_block(device T* param, const device T* grad, device float* master,
                       device float* exp_avg, device float* exp_avg_sq,
                       device float* max_exp_avg_sq, uint i0, uint n, uint vec4, float coef,
                       constant OptimParams& c, constant AdamParams& h) {
  bool ams = h.amsgrad != 0u;
  float w[4], g[4], m[4], v[4], vmax[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  optim_load_w4n(param, master, i0, n, vec4, w);
  optim_load4n(grad, i0, n, vec4, g);
  optim_load4n(exp_avg, i0, n, vec4, m);
  optim_load4n(exp_avg_sq, i0, n, vec4, v);
  if (ams) optim_load4n(max_exp_avg_sq, i0, n, vec4, vmax);
  for (uint k = 0; k < 4u; ++k) {
    float gk = optim_grad(g[k], w[k], coef, c);
    // AdamW decays the weight itself (decay = 1 - lr * wd); Adam adds wd * w to the gradient
    w[k] = w[k] * h.decay;
    if (h.weight_decay != 0.0f) gk = gk + h.weight_decay * w[k];
    m[k] = m[k] + h.one_minus_beta1 * (gk - m[k]);  // torch's exp_avg.lerp_(grad, 1 - beta1)
    v[k] = v[k] * h.beta2 + h.one_minus_beta2 * gk * gk;
    float vk = v[k];
    if (ams) {
      vmax[k] = max(vmax[k], v[k]);
      vk = vmax[k];
    }
    float denom = precise::sqrt(vk) / h.bc2_sqrt + h.eps;
    w[k] = w[k] + (-h.step_size * m[k]) / denom;  // torch's addcdiv order: (value * m) / denom
  }
  optim_store_w4n(param, master, i0, n, vec4, w);
  optim_store4n(exp_avg, i0, n, vec4, m);
  optim_store4n(exp_avg_sq, i0, n, vec4, v);
  if (ams) optim_store4n(max_exp_avg_sq, i0, n, vec4, vmax);
}

template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void adam_step(device T* param [[buffer(0)]], const device T* grad [[buffer(1)]],
                      device float* master [[buffer(2)]], device float* exp_avg [[buffer(3)]],
                      device float* exp_avg_sq [[buffer(4)]],
                      device float* max_exp_avg_sq [[buffer(5)]],
                      const device float* gnorm [[buffer(6)]],
                      constant OptimParams& c [[buffer(7)]], constant AdamParams& h [[buffer(8)]],
                      uint gid [[thread_position_in_grid]]) {
  uint i0 = gid * 4u;
  if (i0 >= c.n) return;
  adam_block(param, grad, master, exp_avg, exp_avg_sq, max_exp_avg_sq, i0, c.n, c.vec4,
             optim_clip_coef(gnorm, c), c, h);
}

// ---- RMSProp: torch.optim.RMSprop (alpha, eps, centered, momentum, weight_decay, maximize) --
template <typename T>
inline void rmsprop_block(device T* param, const device T* grad, device float* master,
                          device float* square_avg, device float* grad_avg,
                          device float* momentum_buffer, uint i0, uint n, uint vec4, float coef,
                          constant OptimParams& c, constant RMSPropParams& h) {
  bool centered = h.centered != 0u;
  bool use_buf = h.momentum > 0.0f;
  float w[4], g[4], sq[4];
  float ga[4] = {0.0f, 0.0f, 0.0f, 0.0f}, b[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  optim_load_w4n(param, master, i0, n, vec4, w);
  optim_load4n(grad, i0, n, vec4, g);
  optim_load4n(square_avg, i0, n, vec4, sq);
  if (centered) optim_load4n(grad_avg, i0, n, vec4, ga);
  if (use_buf) optim_load4n(momentum_buffer, i0, n, vec4, b);
  for (uint k = 0; k < 4u; ++k) {
    float gk = optim_grad(g[k], w[k], coef, c);
    if (h.weight_decay != 0.0f) gk = gk + h.weight_decay * w[k];
    sq[k] = sq[k] * h.alpha + h.one_minus_alpha * gk * gk;
    float avg;
    if (centered) {
      ga[k] = ga[k] + h.one_minus_alpha * (gk - ga[k]);
      avg = precise::sqrt(sq[k] + (-ga[k]) * ga[k]);
    } else {
      avg = precise::sqrt(sq[k]);
    }
    avg = avg + h.eps;
    if (use_buf) {
      b[k] = b[k] * h.momentum + gk / avg;
      w[k] = w[k] - c.lr * b[k];
    } else {
      w[k] = w[k] + (-c.lr * gk) / avg;
    }
  }
  optim_store_w4n(param, master, i0, n, vec4, w);
  optim_store4n(square_avg, i0, n, vec4, sq);
  if (centered) optim_store4n(grad_avg, i0, n, vec4, ga);
  if (use_buf) optim_store4n(momentum_buffer, i0, n, vec4, b);
}

template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void rmsprop_step(device T* param [[buffer(0)]], const device T* grad [[buffer(1)]],
                         device float* master [[buffer(2)]],
                         device float* square_avg [[buffer(3)]],
                         device float* grad_avg [[buffer(4)]],
                         device float* momentum_buffer [[buffer(5)]],
                         const device float* gnorm [[buffer(6)]],
                         constant OptimParams& c [[buffer(7)]],
                         constant RMSPropParams& h [[buffer(8)]],
                         uint gid [[thread_position_in_grid]]) {
  uint i0 = gid * 4u;
  if (i0 >= c.n) return;
  rmsprop_block(param, grad, master, square_avg, grad_avg, momentum_buffer, i0, c.n, c.vec4,
                optim_clip_coef(gnorm, c), c, h);
}

// ---- multi-tensor updates: one launch for many tensors (PyTorch's multi_tensor_apply) -------
// Every tensor is a range of one base buffer per argument: params, grads and each state kind
// (the caller lays the states out like the params). `chunks` is a table of OPTIM_CHUNK_WORDS
// uints per row (kernels/params.h OptimChunk: param, grad and state element offsets of the
// chunk's first element, its length n <= OPTIM_CHUNK, vec4); threadgroup t updates chunk t, each
// thread 4 consecutive elements per pass, with exactly the per-tensor kernels' block function.
// Every tensor of a launch shares OptimParams (n and vec4 unused) and the rule's struct.
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void sgd_step_multi(device T* param [[buffer(0)]], const device T* grad [[buffer(1)]],
                           device float* master [[buffer(2)]],
                           device float* momentum_buffer [[buffer(3)]],
                           const device float* gnorm [[buffer(4)]],
                           constant OptimParams& c [[buffer(5)]],
                           constant SGDParams& h [[buffer(6)]],
                           const device uint* chunks [[buffer(7)]],
                           uint tg [[threadgroup_position_in_grid]],
                           uint lid [[thread_position_in_threadgroup]],
                           uint tg_size [[threads_per_threadgroup]]) {
  const device uint* row = chunks + tg * OPTIM_CHUNK_WORDS;
  uint po = row[0], go = row[1], so = row[2], n = row[3], vec4 = row[4];
  float coef = optim_clip_coef(gnorm, c);
  for (uint i0 = lid * 4u; i0 < n; i0 += tg_size * 4u) {
    sgd_block(param + po, grad + go, master + so, momentum_buffer + so, i0, n, vec4, coef, c, h);
  }
}

template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void adam_step_multi(device T* param [[buffer(0)]], const device T* grad [[buffer(1)]],
                            device float* master [[buffer(2)]],
                            device float* exp_avg [[buffer(3)]],
                            device float* exp_avg_sq [[buffer(4)]],
                            device float* max_exp_avg_sq [[buffer(5)]],
                            const device float* gnorm [[buffer(6)]],
                            constant OptimParams& c [[buffer(7)]],
                            constant AdamParams& h [[buffer(8)]],
                            const device uint* chunks [[buffer(9)]],
                            uint tg [[threadgroup_position_in_grid]],
                            uint lid [[thread_position_in_threadgroup]],
                            uint tg_size [[threads_per_threadgroup]]) {
  const device uint* row = chunks + tg * OPTIM_CHUNK_WORDS;
  uint po = row[0], go = row[1], so = row[2], n = row[3], vec4 = row[4];
  float coef = optim_clip_coef(gnorm, c);
  for (uint i0 = lid * 4u; i0 < n; i0 += tg_size * 4u) {
    adam_block(param + po, grad + go, master + so, exp_avg + so, exp_avg_sq + so,
               max_exp_avg_sq + so, i0, n, vec4, coef, c, h);
  }
}

template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void rmsprop_step_multi(device T* param [[buffer(0)]], const device T* grad [[buffer(1)]],
                               device float* master [[buffer(2)]],
                               device float* square_avg [[buffer(3)]],
                               device float* grad_avg [[buffer(4)]],
                               device float* momentum_buffer [[buffer(5)]],
                               const device float* gnorm [[buffer(6)]],
                               constant OptimParams& c [[buffer(7)]],
                               constant RMSPropParams& h [[buffer(8)]],
                               const device uint* chunks [[buffer(9)]],
                               uint tg [[threadgroup_position_in_grid]],
                               uint lid [[thread_position_in_threadgroup]],
                               uint tg_size [[threads_per_threadgroup]]) {
  const device uint* row = chunks + tg * OPTIM_CHUNK_WORDS;
  uint po = row[0], go = row[1], so = row[2], n = row[3], vec4 = row[4];
  float coef = optim_clip_coef(gnorm, c);
  for (uint i0 = lid * 4u; i0 < n; i0 += tg_size * 4u) {
    rmsprop_block(param + po, grad + go, master + so, square_avg + so, grad_avg + so,
                  momentum_buffer + so, i0, n, vec4, coef, c, h);
  }
}

// ---- global gradient norm: gnorm[0] += sum (scale * x)^2 (gnorm holds float bits) -----------
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void optim_sumsq(const device T* x [[buffer(0)]], device atomic_uint* gnorm [[buffer(1)]],
                        constant OptimNormParams& p [[buffer(2)]],
                        uint gid [[thread_position_in_grid]],
                        uint tg_size [[threads_per_threadgroup]],
                        uint n_groups [[threadgroups_per_grid]],
                        uint lane [[thread_index_in_simdgroup]],
                        uint sg [[simdgroup_index_in_threadgroup]],
                        uint n_sg [[simdgroups_per_threadgroup]]) {
  threadgroup float partial[32];
  // 4 independent coalesced loads per iteration keep enough bytes in flight to stream at
  // bandwidth with a grid of only ~1024 threadgroups (n < 2^31, so i + 3 * stride cannot wrap)
  uint stride = tg_size * n_groups;
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  for (uint i = gid; i < p.n; i += 4u * stride) {
    float v0 = float(x[i]) * p.scale;
    float v1 = i + stride < p.n ? float(x[i + stride]) * p.scale : 0.0f;
    float v2 = i + 2u * stride < p.n ? float(x[i + 2u * stride]) * p.scale : 0.0f;
    float v3 = i + 3u * stride < p.n ? float(x[i + 3u * stride]) * p.scale : 0.0f;
    s0 += v0 * v0;
    s1 += v1 * v1;
    s2 += v2 * v2;
    s3 += v3 * v3;
  }
  float s = simd_sum((s0 + s1) + (s2 + s3));
  if (lane == 0u) partial[sg] = s;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0u) {
    float t = lane < n_sg ? partial[lane] : 0.0f;
    t = simd_sum(t);
    if (lane == 0u) {
      // a float add on the bits of an atomic_uint: atomic_float needs MSL 3.0, and metalcompute
      // compiles MSL 2.3; one thread per threadgroup, so the loop rarely retries
      uint old = atomic_load_explicit(gnorm, memory_order_relaxed);
      while (!atomic_compare_exchange_weak_explicit(gnorm, &old, as_type<uint>(as_type<float>(old) + t),
                                                    memory_order_relaxed, memory_order_relaxed)) {
      }
    }
  }
}

// gnorm[0 .. n) = 0 before the optim_sumsq launches of a step (a kernel, so the host never waits)
kernel void optim_zero(device float* x [[buffer(0)]], constant uint& n [[buffer(1)]],
                       uint gid [[thread_position_in_grid]]) {
  if (gid < n) x[gid] = 0.0f;
}

#define OPTIM_INSTANTIATE(T, S)                                                                   \
  template [[host_name("sgd_step_" #S)]] [[kernel]] decltype(sgd_step<T>) sgd_step<T>;           \
  template [[host_name("adam_step_" #S)]] [[kernel]] decltype(adam_step<T>) adam_step<T>;        \
  template [[host_name("rmsprop_step_" #S)]] [[kernel]] decltype(rmsprop_step<T>)                 \
      rmsprop_step<T>;                                                                            \
  template [[host_name("optim_sumsq_" #S)]] [[kernel]] decltype(optim_sumsq<T>) optim_sumsq<T>;

OPTIM_INSTANTIATE(float, float)
OPTIM_INSTANTIATE(half, half)

// multi-tensor updates: float32 parameters (the graph's flat weight buffers)
template [[host_name("sgd_step_multi_float")]] [[kernel]] decltype(sgd_step_multi<float>)
    sgd_step_multi<float>;
template [[host_name("adam_step_multi_float")]] [[kernel]] decltype(adam_step_multi<float>)
    adam_step_multi<float>;
template [[host_name("rmsprop_step_multi_float")]] [[kernel]] decltype(rmsprop_step_multi<float>)
    rmsprop_step_multi<float>;
