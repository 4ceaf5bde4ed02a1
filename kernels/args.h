// args.h -- reading the arrays of the kernel-argument structs (params.h) at a run-time index.
//
// Indexed at run time (p.cols[i] with i computed), a kernel-argument struct is copied by the
// cuda compiler to local memory in every thread: tens of local stores and loads per thread, and
// the load/store queue, not DRAM, then bounds a memory-bound kernel (the channel concat ran at
// 0.35 of the copy bandwidth on an H100). Kernels read those arrays at constant indices only:
// loops over dimensions are unrolled to the array length and guarded by the run-time count, and
// a single run-time index goes through arg_pick8's select chain.
#pragma once
#include <metal_stdlib>
using namespace metal;

// a[i] of an 8-entry argument array, i < 8
inline uint arg_pick8(uint i, constant uint* a) {
    return i < 4u ? (i < 2u ? (i == 0u ? a[0] : a[1]) : (i == 2u ? a[2] : a[3]))
                  : (i < 6u ? (i == 4u ? a[4] : a[5]) : (i == 6u ? a[6] : a[7]));
}
