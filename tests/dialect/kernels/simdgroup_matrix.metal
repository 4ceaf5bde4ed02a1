// Conformance kernels for simdgroup matrices (MSL 2.3 <metal_simdgroup_matrix>). One simdgroup per
// threadgroup of 32 threads; each threadgroup g works on its own 8x8 (or 8x8xK) problem at offset g * 64.
#include <metal_stdlib>
#include <metal_simdgroup_matrix>
using namespace metal;

struct SgmParams {
  uint ksteps;  // D = sum over ksteps of A_k * B_k + C
  uint lda;     // elements per row of A (>= 8 * ksteps) ; B is (8 * ksteps) x 8 row-major
  uint transpose_a;
  uint transpose_b;
};

// d = C + sum_k A[:, 8k:8k+8] * B[8k:8k+8, :], operands loaded from device memory with
// elements_per_row, matrix_origin and transpose_matrix; D in TD, A/B in TAB, C in TC.
template <typename TD, typename TAB, typename TC>
[[max_total_threads_per_threadgroup(32)]] kernel void mac(device const TAB* a [[buffer(0)]], device const TAB* b [[buffer(1)]],
                device const TC* c [[buffer(2)]], device TD* d [[buffer(3)]],
                constant SgmParams& p [[buffer(4)]],
                uint tg [[threadgroup_position_in_grid]]) {
  simdgroup_matrix<TAB, 8, 8> ma, mb;
  simdgroup_matrix<TC, 8, 8> mc;
  simdgroup_matrix<TD, 8, 8> md;
  const ulong kk = 8 * p.ksteps;
  simdgroup_load(mc, c + tg * 64, 8);
  for (uint k = 0; k < p.ksteps; ++k) {
    // A is stored 8 x kk (or kk x 8 when transposed): the block at column 8k (row 8k)
    if (p.transpose_a != 0) {
      simdgroup_load(ma, a + tg * 8 * kk, 8, ulong2(0, 8 * k), true);
    } else {
      simdgroup_load(ma, a + tg * 8 * kk, kk, ulong2(8 * k, 0), false);
    }
    if (p.transpose_b != 0) {
      simdgroup_load(mb, b + tg * 8 * kk, kk, ulong2(8 * k, 0), true);
    } else {
      simdgroup_load(mb, b + tg * 8 * kk, 8, ulong2(0, 8 * k));
    }
    if (k == 0) {
      simdgroup_multiply_accumulate(md, ma, mb, mc);
    } else {
      simdgroup_multiply_accumulate(md, ma, mb, md);
    }
  }
  simdgroup_store(md, d + tg * 64, 8);
}

template [[host_name("mac_fff")]] kernel void mac<float, float, float>(
    device const float*, device const float*, device const float*, device float*,
    constant SgmParams&, uint);
template [[host_name("mac_fhf")]] kernel void mac<float, half, float>(
    device const half*, device const half*, device const float*, device float*,
    constant SgmParams&, uint);
template [[host_name("mac_hhh")]] kernel void mac<half, half, half>(
    device const half*, device const half*, device const half*, device half*,
    constant SgmParams&, uint);

// Through threadgroup memory: stage A and B with every lane, a barrier, multiply, store
// transposed into threadgroup memory, copy out. Also exercises simdgroup_multiply,
// make_filled_simdgroup_matrix and the diagonal constructor: out = (A * B) ^ T + 2 I + 0.5.
template <typename T>
[[max_total_threads_per_threadgroup(32)]] kernel void tg_mul(device const T* a [[buffer(0)]], device const T* b [[buffer(1)]],
                   device T* out [[buffer(2)]],
                   uint tg [[threadgroup_position_in_grid]],
                   uint lane [[thread_index_in_simdgroup]]) {
  threadgroup T sa[64];
  threadgroup T sb[64];
  threadgroup T so[64];
  for (uint i = lane; i < 64; i += 32) {
    sa[i] = a[tg * 64 + i];
    sb[i] = b[tg * 64 + i];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_matrix<T, 8, 8> ma, mb, mp;
  simdgroup_load(ma, sa);
  simdgroup_load(mb, sb);
  simdgroup_multiply(mp, ma, mb);
  simdgroup_matrix<T, 8, 8> eye2 = simdgroup_matrix<T, 8, 8>(T(2));
  simdgroup_matrix<T, 8, 8> halfs = make_filled_simdgroup_matrix<T, 8, 8>(T(0.5));
  simdgroup_matrix<T, 8, 8> ones = simdgroup_matrix<T, 8, 8>(T(1));
  simdgroup_multiply_accumulate(mp, eye2, ones, mp);    // + 2 I
  simdgroup_multiply_accumulate(mp, halfs, ones, mp);   // + 0.5 everywhere
  simdgroup_store(mp, so, 8, 0, true);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint i = lane; i < 64; i += 32) {
    out[tg * 64 + i] = so[i];
  }
}

template [[host_name("tg_mul_float")]] kernel void tg_mul<float>(
    device const float*, device const float*, device float*, uint, uint);
template [[host_name("tg_mul_half")]] kernel void tg_mul<half>(
    device const half*, device const half*, device half*, uint, uint);

// The standard names and a store at an origin into a wider row.
kernel void named_types(device const half* a [[buffer(0)]], device float* out [[buffer(1)]]) {
  simdgroup_half8x8 ma;
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(1.0);
  simdgroup_half8x8 ident = simdgroup_half8x8(1.0h);
  simdgroup_load(ma, a);
  simdgroup_multiply_accumulate(acc, ma, ident, acc);   // a + 1
  simdgroup_store(acc, out, 16, ulong2(8, 0));           // right half of an 8 x 16 block
}
