// Conformance kernels for the simdgroup tile functions (kernels/simdgroup_tile.h): one simdgroup
// per threadgroup of 32 threads; threadgroup g computes D_g (8FM x 8FN) = C_g + A_g B_g with
// A_g (8FM x 16 ksteps) and B_g (16 ksteps x 8FN) staged in threadgroup memory at row pitches
// pa, pb (elements; any value >= the row length, aligned or not), then stored to D_g.
#include <metal_stdlib>
#include <metal_simdgroup_matrix>
#include "simdgroup_tile.h"
using namespace metal;

struct TileParams {
  uint ksteps;  // 16-deep products
  uint pa;      // row pitch of A in threadgroup memory (elements)
  uint pb;      // row pitch of B
  uint offset;  // elements before A's and B's first row (alignment of the tiles)
  uint b_direct;  // 1: the product reads B from threadgroup memory itself
};

#define MAXK 32

template <typename TAB, typename TC, int FM, int FN>
[[max_total_threads_per_threadgroup(32)]] kernel void tile_mac(device const TAB* a [[buffer(0)]],
                                                               device const TAB* b [[buffer(1)]],
                                                               device const TC* c [[buffer(2)]],
                                                               device TC* d [[buffer(3)]],
                                                               constant TileParams& p [[buffer(4)]],
                                                               uint tg [[threadgroup_position_in_grid]],
                                                               uint lane [[thread_index_in_simdgroup]]) {
  // staging: A rows of up to MAXK + 9 elements, B rows of up to 8 FN + 9; 16-byte aligned arrays
  threadgroup float4 sa4[(8 * FM * (MAXK + 9) + 8) * sizeof(TAB) / 16 + 1];
  threadgroup float4 sb4[(MAXK * (8 * FN + 9) + 8) * sizeof(TAB) / 16 + 1];
  threadgroup TAB* sa = (threadgroup TAB*)sa4;
  threadgroup TAB* sb = (threadgroup TAB*)sb4;
  const uint kk = 16 * p.ksteps;
  device const TAB* ag = a + tg * (8 * FM) * kk;
  device const TAB* bg = b + tg * kk * (8 * FN);
  for (uint i = lane; i < uint(8 * FM) * kk; i += 32) {
    sa[p.offset + (i / kk) * p.pa + i % kk] = ag[i];
  }
  for (uint i = lane; i < kk * uint(8 * FN); i += 32) {
    sb[p.offset + (i / uint(8 * FN)) * p.pb + i % uint(8 * FN)] = bg[i];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_matrix<TC, 8, 8> acc[FM * FN];
  for (int i = 0; i < FM; ++i) {
    for (int j = 0; j < FN; ++j) {
      simdgroup_load(acc[i * FN + j], c + tg * (64 * FM * FN), 8 * FN, ulong2(8 * j, 8 * i));
    }
  }
  for (uint s = 0; s < p.ksteps; ++s) {
    simdgroup_matrix<TAB, 8, 8> ma[FM * 2];
    simdgroup_load_tile<FM, 2>(ma, sa + p.offset + 16 * s, p.pa);
    if (p.b_direct != 0) {
      simdgroup_multiply_accumulate_tile<FM, FN>(acc, ma, sb + p.offset + 16 * s * p.pb, p.pb);
    } else {
      simdgroup_matrix<TAB, 8, 8> mb[2 * FN];
      simdgroup_load_tile<2, FN>(mb, sb + p.offset + 16 * s * p.pb, p.pb);
      simdgroup_multiply_accumulate_tile<FM, FN>(acc, ma, mb);
    }
  }
  for (int i = 0; i < FM; ++i) {
    for (int j = 0; j < FN; ++j) {
      simdgroup_store(acc[i * FN + j], d + tg * (64 * FM * FN), 8 * FN, ulong2(8 * j, 8 * i));
    }
  }
}

#define TILE_MAC(NAME, TAB, TC, FM, FN)                                                           \
  template [[host_name(NAME)]] kernel void tile_mac<TAB, TC, FM, FN>(                             \
      device const TAB*, device const TAB*, device const TC*, device TC*, constant TileParams&,   \
      uint, uint);
// <operands><accumulator>_<FM>x<FN>: even and odd row grids, tiles that ldmatrix covers (R * C a
// multiple of 4) and tiles it does not, half and float accumulators, float operands
TILE_MAC("tile_mac_hf_2x4", half, float, 2, 4)
TILE_MAC("tile_mac_hf_3x2", half, float, 3, 2)
TILE_MAC("tile_mac_hf_4x1", half, float, 4, 1)
TILE_MAC("tile_mac_hh_2x4", half, half, 2, 4)
TILE_MAC("tile_mac_hh_3x2", half, half, 3, 2)
TILE_MAC("tile_mac_ff_2x2", float, float, 2, 2)
