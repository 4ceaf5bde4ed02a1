// gemm_tiles.metal -- tile-shape / slice-depth sweep of the current kernel (kernels/gemm.metal,
// included whole): extra instantiations gemm_fwd_<BM>x<BN>k<BK>[_splitk]_<variant> that
// benchmarks/dev_gemm.py times next to the production tiles. A shape that wins gets added to
// gemm.metal's instantiation list and to TILES in pymetalnn/ops/gemm.py.
#include "gemm.metal"

// 128x128k16 is instantiated in gemm.metal for float and hacc_half; its half kernels here
GEMM_KERNEL(gemm_fwd_128x128k16_half, gemm_tiled, half, float, half, 128, 128, 16)
GEMM_KERNEL(gemm_fwd_128x128k16_splitk_half, gemm_tiled, half, float, float, 128, 128, 16)
GEMM_INST(128x64k8, 128, 64, 8)
GEMM_INST(64x128k8, 64, 128, 8)
GEMM_INST(64x64k8, 64, 64, 8)

// fp16 accumulators take half the registers: bigger tiles only for hacc_half
#define GEMM_INST_HACC(TILE, BM, BN, BK) \
    GEMM_KERNEL(gemm_fwd_##TILE##_hacc_half, gemm_tiled, half, half, half, BM, BN, BK)
GEMM_INST_HACC(128x256k8, 128, 256, 8)
GEMM_INST_HACC(256x128k8, 256, 128, 8)
GEMM_INST_HACC(128x256k16, 128, 256, 16)
