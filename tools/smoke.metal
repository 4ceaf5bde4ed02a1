#include <metal_stdlib>
using namespace metal;

struct P { uint n; float scale; };
constant float kTable[2] = {1.0, 2.0};

#define INST(T, NAME) template [[host_name(#NAME)]] [[kernel]] void scale_k<T>(device T* x [[buffer(0)]], constant P& p [[buffer(1)]], uint gid [[thread_position_in_grid]]);

inline float helper(float a) { return metal::precise::exp(a) * 0.5; }

template <typename T>
[[kernel]] void scale_k(device T* x [[buffer(0)]], constant P& p [[buffer(1)]],
                        uint gid [[thread_position_in_grid]]) {
  if (gid >= p.n) return;
  x[gid] = T(float(x[gid]) * p.scale * kTable[1]);
}
INST(float, scale_float)
INST(half, scale_half)

[[max_total_threads_per_threadgroup(128)]]
kernel void red(const device float* x [[buffer(0)]], device atomic_float* out [[buffer(1)]],
                constant uint& n [[buffer(2)]],
                uint gid [[thread_position_in_grid]], uint lid [[thread_position_in_threadgroup]],
                uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float partial[4];
  float v = gid < n ? x[gid] : 0.0;
  v = simd_sum(v);
  if (lane == 0) partial[sg] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    float w = lane < 4 ? partial[lane] : 0.0f;
    w = simd_sum(w);
    if (lane == 0) atomic_fetch_add_explicit(out, w, memory_order_relaxed);
  }
}
