// conv_tiles.metal -- experimental tile shapes of the conv kernels, for benchmarks/dev_conv.py.
// The templates are kernels/conv.metal's (included without its instances); this file only
// instantiates other shapes: the production tiles under their own names, plus deeper slices
// (k16: BK = 16 halves the per-slice overhead -- loop, barrier -- at the cost of more prefetch
// registers; t128x64k16 and t128x32k16 were promoted to conv.metal after the H200 sweep of
// 2026-11-26), a shallower weight-gradient slice (k8), and version 1 of the forward / input
// gradient (u: weights read in their (K, C/G, KH, KW) layout, unpacked: one sector per element). A winner is promoted by adding its
// instance to conv.metal and its row to TILES in pymetalnn/ops/conv.py.
#define CONV_NO_INSTANCES
#include "conv.metal"

#define CONV_DEV_PREC(NAME, T, A)                                                                    \
    CONV_INST_PREC(NAME, T, A)                                                                       \
    INSTANTIATE("conv2d_fwd_t128x128k16_" NAME, conv2d_fwd_tiled, T, A, 128, 128, 16, 8, 8, true, false)          \
    INSTANTIATE("conv2d_bwd_data_t128x128k16_" NAME, conv2d_bwd_data_tiled, T, A, 128, 128, 16, 8, 8, true, false) \
    INSTANTIATE("conv2d_fwd_t128x64u_" NAME, conv2d_fwd_tiled, T, A, 128, 64, 8, 8, 4, false, false)        \
    INSTANTIATE("conv2d_bwd_data_t128x64u_" NAME, conv2d_bwd_data_tiled, T, A, 128, 64, 8, 8, 4, false, false) \
    INSTANTIATE("conv2d_bwd_weight_t64x64k8_" NAME, conv2d_bwd_weight_tiled, T, A, 64, 64, 8, 4, 4, false)  \
    INSTANTIATE("conv2d_bwd_weight_t128x128k16_" NAME, conv2d_bwd_weight_tiled, T, A, 128, 128, 16, 8, 8, false) \
    INSTANTIATE("conv2d_bwd_weight_t128x64k16_" NAME, conv2d_bwd_weight_tiled, T, A, 128, 64, 16, 8, 4, false) \
    INSTANTIATE("conv2d_bwd_weight_t128x32k16_" NAME, conv2d_bwd_weight_tiled, T, A, 128, 32, 16, 4, 4, false) \
    INSTANTIATE("conv2d_bwd_weight_t64x64k32_" NAME, conv2d_bwd_weight_tiled, T, A, 64, 64, 32, 4, 4, false)

CONV_DEV_PREC("float", float, float)
CONV_INST_ROWS("float", float, float)
CONV_DEV_PREC("half", half, float)
CONV_DEV_PREC("hacc_half", half, half)
CONV_INST_STORAGE("float", float)
CONV_INST_STORAGE("half", half)
