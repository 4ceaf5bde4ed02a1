// simdgroup_tile.h -- tiles of 8x8 simdgroup matrices (a pymetalnn extension, docs/dialect.md).
//
// Matrix arrays are row-major grids of 8x8 blocks:
//   simdgroup_load_tile<R, C>(d, src, elements_per_row)
//       d[r * C + c] = the 8x8 block at rows 8r, columns 8c of src (threadgroup memory)
//   simdgroup_multiply_accumulate_tile<FM, FN>(c, a, b)
//       a 16-deep product, A an FM x 2 grid, B 2 x FN, C FM x FN:
//       c[i][j] = a[i][0] * b[0][j] + c[i][j], then c[i][j] = a[i][1] * b[1][j] + c[i][j]
//   simdgroup_multiply_accumulate_tile<FM, FN>(c, a, b, elements_per_row)
//       the same with B read from threadgroup memory: the 16 x 8FN region at b (what
//       simdgroup_load_tile<2, FN> loads), which lets cuda load B in its tensor-core layout
//
// Why: MSL 2.3 offers 8x8 operations only, while NVIDIA's tensor cores run 16x8x16 blocks; the
// cuda backend implements these two functions in its prelude with ldmatrix (4 blocks per
// instruction) and one mma.sync.m16n8k16 per two row blocks and one column block, which the
// single 8x8 operations cannot reach. Metal compiles the definitions below (plain MSL 2.3: the
// 8x8 operations they stand for); pymetalnn's translator defines __PYMETALNN__ and takes the
// prelude's versions (same results up to the order of the sums; half accumulators are rounded
// once per 16-deep product there).
#pragma once
#include <metal_stdlib>
#include <metal_simdgroup_matrix>
using namespace metal;

#ifndef __PYMETALNN__
template <int R, int C, typename T>
inline void simdgroup_load_tile(thread simdgroup_matrix<T, 8, 8>* d, threadgroup const T* src,
                                ulong elements_per_row) {
    for (int r = 0; r < R; ++r) {
        for (int c = 0; c < C; ++c) {
            simdgroup_load(d[r * C + c], src, elements_per_row, ulong2(8 * c, 8 * r));
        }
    }
}

template <int FM, int FN, typename TC, typename T>
inline void simdgroup_multiply_accumulate_tile(thread simdgroup_matrix<TC, 8, 8>* c,
                                               thread const simdgroup_matrix<T, 8, 8>* a,
                                               thread const simdgroup_matrix<T, 8, 8>* b) {
    for (int i = 0; i < FM; ++i) {
        for (int j = 0; j < FN; ++j) {
            simdgroup_multiply_accumulate(c[i * FN + j], a[2 * i], b[j], c[i * FN + j]);
            simdgroup_multiply_accumulate(c[i * FN + j], a[2 * i + 1], b[FN + j], c[i * FN + j]);
        }
    }
}

template <int FM, int FN, typename TC, typename T>
inline void simdgroup_multiply_accumulate_tile(thread simdgroup_matrix<TC, 8, 8>* c,
                                               thread const simdgroup_matrix<T, 8, 8>* a,
                                               threadgroup const T* b, ulong elements_per_row) {
    simdgroup_matrix<T, 8, 8> mb[2 * FN];
    simdgroup_load_tile<2, FN>(mb, b, elements_per_row);
    for (int i = 0; i < FM; ++i) {
        for (int j = 0; j < FN; ++j) {
            simdgroup_multiply_accumulate(c[i * FN + j], a[2 * i], mb[j], c[i * FN + j]);
            simdgroup_multiply_accumulate(c[i * FN + j], a[2 * i + 1], mb[FN + j], c[i * FN + j]);
        }
    }
}
#endif
