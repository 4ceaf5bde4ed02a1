// optimizer.metal -- fused optimizer updates (pymetalnn.optim): SGD, Adam/AdamW, RMSProp, and the
// gradient-norm reduction behind clip-by-global-norm.
//
// Design. An optimizer step is bound by memory bandwidth (Adam: 16 bytes read and 12 written
// per float32 weight, a few flops), so each rule is ONE elementwise kernel that reads a weight,
// its gradient and its state once and writes weight and state back in place. Constants (1 - beta,
// AdamW's decay factor, log(beta)) are computed on the host in double and arrive in the params
// struct; what depends on the step lives on the device: each tensor's step count t (steps[],
// advanced by optim_count before the updates of a step) and the loss-scaling state (amp, see
// params.h). A kernel computes its bias corrections from t once per thread, so the same launch
// recorded once and replayed is the same computation as a freshly encoded step. Each thread owns 4
// consecutive elements with 4-wide loads (optimizer.h). The arithmetic follows torch.optim's
// single-tensor implementation operation by operation, so trajectories agree to float32
// rounding.
//
// Argument layout (CustomOptimizer kernels use the same):
//   0 param (T), 1 grad (T), 2 master (float32 copy of a half param; the param itself for
//   float), 3 .. 2+k state buffers (float32, k fixed per rule; unused ones get a dummy),
//   3+k gnorm (float, the sum of squares for clip-by-norm), 4+k OptimParams, 5+k the rule's
//   struct (a CustomOptimizer's kernel ends here), 6+k steps (uint, the device step counters,
//   c.step_index this tensor's), 7+k amp (float4: skip the update when amp[AMP_FOUND_INF] != 0,
//   and unscale the gradient by amp[AMP_INV_SCALE]). Launched with ceil(n / 4) threads.
//
// Mixed precision (amp_*): amp_seed writes the scaled loss gradient, amp_check sets
// amp[AMP_FOUND_INF] when a gradient holds an inf or NaN, amp_update applies GradScaler's rule to
// the scale after the updates; the host never reads any of it.
//
// Clip by global norm needs the norm of ALL gradients before any update: optim_zero clears
// gnorm, optim_sumsq (one launch per gradient) adds each tensor's sum of squares into it with a
// two-level reduction (simd_sum, then the threadgroup's partials, then one atomic per
// threadgroup, with a grid-stride loop so the atomics stay few), and the update kernels read
// gnorm[0] themselves: no host round trip.
#include <metal_stdlib>
#include "optimizer.h"
#include "instantiate.h"
using namespace metal;

// expm1 to a few ulp in float (Kahan's trick: the rounding error of exp(x) cancels in
// (u - 1) * x / log(u)); 1 - beta^t = -optim_expm1(t log(beta)) keeps its relative accuracy
// where beta^t is close to 1 (beta2 = 0.999 at small t), unlike 1 - pow(beta, t).
inline float optim_expm1(float x) {
  float u = precise::exp(x);
  if (u == 1.0f) return x;
  float um1 = u - 1.0f;
  if (um1 == -1.0f) return -1.0f;
  return um1 * x / precise::log(u);
}

// The step's gradient scale: 1 / the loss scale (1 without loss scaling).
inline float optim_inv_scale(const device float* amp) { return amp[AMP_INV_SCALE]; }

// Clip-by-global-norm's factor when gnorm[0] holds the sum of squares of the SCALED gradients.
inline float optim_clip_coef_amp(const device float* gnorm, float inv, constant OptimParams& c) {
  if (c.clip_norm == 0u) return 1.0f;
  float norm = precise::sqrt(gnorm[0]) * inv;
  return min(c.max_norm / (norm + 1e-6f), 1.0f);
}

// Each rule's work on the 4 elements [i0, i0 + 4) of one tensor (n elements; vec4: 4-wide
// loads allowed) is one inline function, called by the per-tensor kernel (<rule>_step_<T>) and by
// the multi-tensor kernel (<rule>_step_multi_<T>), so the two paths run the same arithmetic.

// ---- SGD: torch.optim.SGD (momentum, dampening, nesterov, weight_decay, maximize) ----------
template <typename T, typename G>
inline void sgd_block(device T* param, const device G* grad, device float* master,
                      device float* momentum_buffer, uint i0, uint n, uint vec4, float coef,
                      float inv, constant OptimParams& c, constant SGDParams& h) {
  bool use_buf = h.momentum != 0.0f;
  float w[4], g[4], b[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  optim_load_w4n(param, master, i0, n, vec4, w);
  optim_load4n(grad, i0, n, vec4, g);
  if (use_buf && h.first_step == 0u) optim_load4n(momentum_buffer, i0, n, vec4, b);
  for (uint k = 0; k < 4u; ++k) {
    float gk = optim_grad(g[k] * inv, w[k], coef, c);
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

template <typename T, typename G>
[[max_total_threads_per_threadgroup(256)]]
kernel void sgd_step(device T* param [[buffer(0)]], const device G* grad [[buffer(1)]],
                     device float* master [[buffer(2)]],
                     device float* momentum_buffer [[buffer(3)]],
                     const device float* gnorm [[buffer(4)]],
                     constant OptimParams& c [[buffer(5)]], constant SGDParams& h [[buffer(6)]],
                     const device uint* steps [[buffer(7)]], const device float* amp [[buffer(8)]],
                     uint gid [[thread_position_in_grid]]) {
  uint i0 = gid * 4u;
  if (i0 >= c.n || amp[AMP_FOUND_INF] != 0.0f) return;
  float inv = optim_inv_scale(amp);
  sgd_block(param, grad, master, momentum_buffer, i0, c.n, c.vec4,
            optim_clip_coef_amp(gnorm, inv, c), inv, c, h);
}

// ---- Adam / AdamW: torch.optim.Adam, torch.optim.AdamW (amsgrad, maximize) ----------------
// torch's bias corrections at step t: (step_size = lr / (1 - beta1^t), sqrt(1 - beta2^t)), once
// per thread (the multi-tensor kernel's threads run adam_block several times)
inline float2 adam_bias_corrections(uint t, constant AdamParams& h) {
  return float2(h.lr / -optim_expm1(float(t) * h.log_beta1),
                precise::sqrt(-optim_expm1(float(t) * h.log_beta2)));
}

template <typename T, typename G>
inline void adam_block(device T* param, const device G* grad, device float* master,
                       device float* exp_avg, device float* exp_avg_sq,
                       device float* max_exp_avg_sq, uint i0, uint n, uint vec4, float coef,
                       float inv, float2 bc, constant OptimParams& c, constant AdamParams& h) {
  bool ams = h.amsgrad != 0u;
  float step_size = bc.x, bc2_sqrt = bc.y;
  float w[4], g[4], m[4], v[4], vmax[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  optim_load_w4n(param, master, i0, n, vec4, w);
  optim_load4n(grad, i0, n, vec4, g);
  optim_load4n(exp_avg, i0, n, vec4, m);
  optim_load4n(exp_avg_sq, i0, n, vec4, v);
  if (ams) optim_load4n(max_exp_avg_sq, i0, n, vec4, vmax);
  for (uint k = 0; k < 4u; ++k) {
    float gk = optim_grad(g[k] * inv, w[k], coef, c);
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
    float denom = precise::sqrt(vk) / bc2_sqrt + h.eps;
    w[k] = w[k] + (-step_size * m[k]) / denom;  // torch's addcdiv order: (value * m) / denom
  }
  optim_store_w4n(param, master, i0, n, vec4, w);
  optim_store4n(exp_avg, i0, n, vec4, m);
  optim_store4n(exp_avg_sq, i0, n, vec4, v);
  if (ams) optim_store4n(max_exp_avg_sq, i0, n, vec4, vmax);
}

template <typename T, typename G>
[[max_total_threads_per_threadgroup(256)]]
kernel void adam_step(device T* param [[buffer(0)]], const device G* grad [[buffer(1)]],
                      device float* master [[buffer(2)]], device float* exp_avg [[buffer(3)]],
                      device float* exp_avg_sq [[buffer(4)]],
                      device float* max_exp_avg_sq [[buffer(5)]],
                      const device float* gnorm [[buffer(6)]],
                      constant OptimParams& c [[buffer(7)]], constant AdamParams& h [[buffer(8)]],
                      const device uint* steps [[buffer(9)]], const device float* amp [[buffer(10)]],
                      uint gid [[thread_position_in_grid]]) {
  uint i0 = gid * 4u;
  if (i0 >= c.n || amp[AMP_FOUND_INF] != 0.0f) return;
  float inv = optim_inv_scale(amp);
  adam_block(param, grad, master, exp_avg, exp_avg_sq, max_exp_avg_sq, i0, c.n, c.vec4,
             optim_clip_coef_amp(gnorm, inv, c), inv,
             adam_bias_corrections(steps[c.step_index], h), c, h);
}

// ---- RMSProp: torch.optim.RMSprop (alpha, eps, centered, momentum, weight_decay, maximize) --
template <typename T, typename G>
inline void rmsprop_block(device T* param, const device G* grad, device float* master,
                          device float* square_avg, device float* grad_avg,
                          device float* momentum_buffer, uint i0, uint n, uint vec4, float coef,
                          float inv, constant OptimParams& c, constant RMSPropParams& h) {
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
    float gk = optim_grad(g[k] * inv, w[k], coef, c);
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

template <typename T, typename G>
[[max_total_threads_per_threadgroup(256)]]
kernel void rmsprop_step(device T* param [[buffer(0)]], const device G* grad [[buffer(1)]],
                         device float* master [[buffer(2)]],
                         device float* square_avg [[buffer(3)]],
                         device float* grad_avg [[buffer(4)]],
                         device float* momentum_buffer [[buffer(5)]],
                         const device float* gnorm [[buffer(6)]],
                         constant OptimParams& c [[buffer(7)]],
                         constant RMSPropParams& h [[buffer(8)]],
                         const device uint* steps [[buffer(9)]],
                         const device float* amp [[buffer(10)]],
                         uint gid [[thread_position_in_grid]]) {
  uint i0 = gid * 4u;
  if (i0 >= c.n || amp[AMP_FOUND_INF] != 0.0f) return;
  float inv = optim_inv_scale(amp);
  rmsprop_block(param, grad, master, square_avg, grad_avg, momentum_buffer, i0, c.n, c.vec4,
                optim_clip_coef_amp(gnorm, inv, c), inv, c, h);
}

// ---- multi-tensor updates: one launch for many tensors (PyTorch's multi_tensor_apply) -------
// Every tensor is a range of one base buffer per argument: params, grads and each state kind
// (the caller lays the states out like the params). `chunks` is a table of OPTIM_CHUNK_WORDS
// uints per row (kernels/params.h OptimChunk: param, grad and state element offsets of the
// chunk's first element, its length n <= OPTIM_CHUNK, vec4); threadgroup t updates chunk t, each
// thread 4 consecutive elements per pass, with exactly the per-tensor kernels' block function.
// Every tensor of a launch shares OptimParams (n and vec4 unused) and the rule's struct.
template <typename G>
[[max_total_threads_per_threadgroup(256)]]
kernel void sgd_step_multi(device float* param [[buffer(0)]], const device G* grad [[buffer(1)]],
                           device float* master [[buffer(2)]],
                           device float* momentum_buffer [[buffer(3)]],
                           const device float* gnorm [[buffer(4)]],
                           constant OptimParams& c [[buffer(5)]],
                           constant SGDParams& h [[buffer(6)]],
                           const device uint* chunks [[buffer(7)]],
                           const device uint* steps [[buffer(8)]],
                           const device float* amp [[buffer(9)]],
                           uint tg [[threadgroup_position_in_grid]],
                           uint lid [[thread_position_in_threadgroup]],
                           uint tg_size [[threads_per_threadgroup]]) {
  if (amp[AMP_FOUND_INF] != 0.0f) return;
  const device uint* row = chunks + tg * OPTIM_CHUNK_WORDS;
  uint po = row[0], go = row[1], so = row[2], n = row[3], vec4 = row[4];
  float inv = optim_inv_scale(amp);
  float coef = optim_clip_coef_amp(gnorm, inv, c);
  if (h.momentum == 0.0f && h.weight_decay == 0.0f && c.clip_value == 0u && c.maximize == 0u &&
      c.reg_type == 0u) {
    // plain SGD (torch.optim.SGD's defaults): sgd_block's arithmetic with its per-element
    // branches on uniform options gone, a loop a CPU vectorizes (ResNet-18's 11.7M weights:
    // 25 ms a step on the 2-core test box the general way)
    device float* w = param + po;
    const device G* g = grad + go;
    for (uint i0 = lid * 4u; i0 < n; i0 += tg_size * 4u) {
      const uint e = min(i0 + 4u, n);
      for (uint i = i0; i < e; ++i) {
        w[i] = w[i] - c.lr * (((float(g[i]) * inv) * c.grad_rescale) * coef);
      }
    }
    return;
  }
  for (uint i0 = lid * 4u; i0 < n; i0 += tg_size * 4u) {
    sgd_block(param + po, grad + go, master + so, momentum_buffer + so, i0, n, vec4, coef, inv, c,
              h);
  }
}

template <typename G>
[[max_total_threads_per_threadgroup(256)]]
kernel void adam_step_multi(device float* param [[buffer(0)]], const device G* grad [[buffer(1)]],
                            device float* master [[buffer(2)]],
                            device float* exp_avg [[buffer(3)]],
                            device float* exp_avg_sq [[buffer(4)]],
                            device float* max_exp_avg_sq [[buffer(5)]],
                            const device float* gnorm [[buffer(6)]],
                            constant OptimParams& c [[buffer(7)]],
                            constant AdamParams& h [[buffer(8)]],
                            const device uint* chunks [[buffer(9)]],
                            const device uint* steps [[buffer(10)]],
                            const device float* amp [[buffer(11)]],
                            uint tg [[threadgroup_position_in_grid]],
                            uint lid [[thread_position_in_threadgroup]],
                            uint tg_size [[threads_per_threadgroup]]) {
  if (amp[AMP_FOUND_INF] != 0.0f) return;
  const device uint* row = chunks + tg * OPTIM_CHUNK_WORDS;
  uint po = row[0], go = row[1], so = row[2], n = row[3], vec4 = row[4];
  float2 bc = adam_bias_corrections(steps[row[5]], h);
  float inv = optim_inv_scale(amp);
  float coef = optim_clip_coef_amp(gnorm, inv, c);
  for (uint i0 = lid * 4u; i0 < n; i0 += tg_size * 4u) {
    adam_block(param + po, grad + go, master + so, exp_avg + so, exp_avg_sq + so,
               max_exp_avg_sq + so, i0, n, vec4, coef, inv, bc, c, h);
  }
}

template <typename G>
[[max_total_threads_per_threadgroup(256)]]
kernel void rmsprop_step_multi(device float* param [[buffer(0)]], const device G* grad [[buffer(1)]],
                               device float* master [[buffer(2)]],
                               device float* square_avg [[buffer(3)]],
                               device float* grad_avg [[buffer(4)]],
                               device float* momentum_buffer [[buffer(5)]],
                               const device float* gnorm [[buffer(6)]],
                               constant OptimParams& c [[buffer(7)]],
                               constant RMSPropParams& h [[buffer(8)]],
                               const device uint* chunks [[buffer(9)]],
                               const device uint* steps [[buffer(10)]],
                               const device float* amp [[buffer(11)]],
                               uint tg [[threadgroup_position_in_grid]],
                               uint lid [[thread_position_in_threadgroup]],
                               uint tg_size [[threads_per_threadgroup]]) {
  if (amp[AMP_FOUND_INF] != 0.0f) return;
  const device uint* row = chunks + tg * OPTIM_CHUNK_WORDS;
  uint po = row[0], go = row[1], so = row[2], n = row[3], vec4 = row[4];
  float inv = optim_inv_scale(amp);
  float coef = optim_clip_coef_amp(gnorm, inv, c);
  for (uint i0 = lid * 4u; i0 < n; i0 += tg_size * 4u) {
    rmsprop_block(param + po, grad + go, master + so, square_avg + so, grad_avg + so,
                  momentum_buffer + so, i0, n, vec4, coef, inv, c, h);
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

// ---- device step counters ------------------------------------------------------------------
// Launched before the updates of a step: every updated tensor's count advances unless the step is
// skipped (a loss-scaled step whose gradients overflowed leaves the optimizer untouched, step count
// included, as GradScaler.step skipping optimizer.step()).
kernel void optim_count(device uint* steps [[buffer(0)]], const device float* amp [[buffer(1)]],
                        constant OptimCountParams& p [[buffer(2)]],
                        uint gid [[thread_position_in_grid]]) {
  if (gid < p.n && amp[AMP_FOUND_INF] == 0.0f) steps[p.first + gid] += 1u;
}

// ---- dynamic loss scaling: torch.cuda.amp.GradScaler on the device -----------------------------
// amp_begin: a new step's gradients are clean until amp_check finds otherwise.
kernel void amp_begin(device float* amp [[buffer(0)]], uint gid [[thread_position_in_grid]]) {
  if (gid == 0u) amp[AMP_FOUND_INF] = 0.0f;
}

// amp_seed: the loss gradient dL/dloss_i = base * scale (base = 1 / N for a mean), n elements.
kernel void amp_seed(device float* seed [[buffer(0)]], const device float* amp [[buffer(1)]],
                     constant AmpParams& p [[buffer(2)]], uint gid [[thread_position_in_grid]]) {
  if (gid < p.n) seed[gid] = p.base * amp[AMP_SCALE];
}

// amp_check: amp[AMP_FOUND_INF] = 1 if any of x[0 .. n) is inf or NaN (the exponent bits all
// ones, tested on the bits so that fast math cannot fold the test away). Every writer stores the
// same value, so plain stores suffice.
inline bool amp_nonfinite(uint bits) { return (bits & 0x7F800000u) == 0x7F800000u; }
inline bool amp_nonfinite(ushort bits) { return (uint(bits) & 0x7C00u) == 0x7C00u; }

template <typename U>
[[max_total_threads_per_threadgroup(256)]]
kernel void amp_check(const device U* x [[buffer(0)]], device float* amp [[buffer(1)]],
                      constant AmpParams& p [[buffer(2)]], uint gid [[thread_position_in_grid]],
                      uint tg_size [[threads_per_threadgroup]],
                      uint n_groups [[threadgroups_per_grid]]) {
  const uint stride = tg_size * n_groups;
  bool bad = false;
  for (uint i = gid; i < p.n; i += stride) bad = bad || amp_nonfinite(x[i]);
  if (bad) amp[AMP_FOUND_INF] = 1.0f;
}

// amp_check_multi: the same over many tensors in one base buffer (a step's weight gradients in
// the memory plan's arena): a table of (element offset, n <= OPTIM_CHUNK) rows, one threadgroup
// per row, as the multi-tensor updates.
template <typename U>
[[max_total_threads_per_threadgroup(256)]]
kernel void amp_check_multi(const device U* x [[buffer(0)]], device float* amp [[buffer(1)]],
                            const device uint* chunks [[buffer(2)]],
                            uint tg [[threadgroup_position_in_grid]],
                            uint lid [[thread_position_in_threadgroup]],
                            uint tg_size [[threads_per_threadgroup]]) {
  const uint off = chunks[2u * tg], n = chunks[2u * tg + 1u];
  bool bad = false;
  for (uint i = lid; i < n; i += tg_size) bad = bad || amp_nonfinite(x[off + i]);
  if (bad) amp[AMP_FOUND_INF] = 1.0f;
}

// amp_update: after the step's updates, GradScaler.update(): an overflowed step multiplies the
// scale by backoff_factor and restarts the count of clean steps; growth_interval clean steps in a
// row multiply it by growth_factor (unless that overflows float).
kernel void amp_update(device float* amp [[buffer(0)]], constant AmpParams& p [[buffer(1)]],
                       uint gid [[thread_position_in_grid]]) {
  if (gid != 0u) return;
  float scale = amp[AMP_SCALE];
  if (amp[AMP_FOUND_INF] != 0.0f) {
    scale = scale * p.backoff_factor;
    amp[AMP_TRACKER] = 0.0f;
  } else {
    float tracker = amp[AMP_TRACKER] + 1.0f;
    if (tracker >= float(p.growth_interval)) {
      float grown = scale * p.growth_factor;
      uint gb = as_type<uint>(grown);
      if ((gb & 0x7F800000u) != 0x7F800000u) scale = grown;
      tracker = 0.0f;
    }
    amp[AMP_TRACKER] = tracker;
  }
  amp[AMP_SCALE] = scale;
  amp[AMP_INV_SCALE] = 1.0f / scale;
}

// the gradients' bits: uint for float, ushort for half
INSTANTIATE("amp_check_float", amp_check, uint)
INSTANTIATE("amp_check_half", amp_check, ushort)
INSTANTIATE("amp_check_multi_float", amp_check_multi, uint)
INSTANTIATE("amp_check_multi_half", amp_check_multi, ushort)

// <rule>_step_<T>: T parameters and gradients; <rule>_step_hgrad_float: float32 parameters with
// float16 gradients (a mixed-precision graph's fp32 master weights, updated from fp16 gradients).
#define OPTIM_INSTANTIATE(T, G, S)                                                                \
  INSTANTIATE("sgd_step_" #S, sgd_step, T, G)                                                     \
  INSTANTIATE("adam_step_" #S, adam_step, T, G)                                                   \
  INSTANTIATE("rmsprop_step_" #S, rmsprop_step, T, G)

OPTIM_INSTANTIATE(float, float, float)
OPTIM_INSTANTIATE(half, half, half)
OPTIM_INSTANTIATE(float, half, hgrad_float)

INSTANTIATE("optim_sumsq_float", optim_sumsq, float)
INSTANTIATE("optim_sumsq_half", optim_sumsq, half)

// multi-tensor updates: float32 parameters (the graph's flat weight buffers), float32 or float16
// gradients
#define OPTIM_INSTANTIATE_MULTI(G, S)                                                             \
  INSTANTIATE("sgd_step_multi_" #S, sgd_step_multi, G)                                            \
  INSTANTIATE("adam_step_multi_" #S, adam_step_multi, G)                                          \
  INSTANTIATE("rmsprop_step_multi_" #S, rmsprop_step_multi, G)

OPTIM_INSTANTIATE_MULTI(float, float)
OPTIM_INSTANTIATE_MULTI(half, hgrad_float)
