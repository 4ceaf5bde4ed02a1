// prelude_xk.cu -- the cross-check kernel (xk.h) as a CUDA kernel (tools/prelude_check.py --cuda, --gpu).
#include "pmn_prelude.h"
#include "xk.h"

extern "C" __global__ void xk_kernel(unsigned scen, unsigned* out, unsigned char* kinds, unsigned* scratch) {
  xk_body(threadIdx.x, scen, out, kinds, scratch);
}
