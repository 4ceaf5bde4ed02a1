// params.h -- every kernel's parameter struct, one per op, in one place (as ggml-metal's
// ggml-metal-impl.h). Fields are 4 bytes (uint, int, float) so the layout is the same for Metal,
// CUDA, C++ and the Python mirror in pymetalnn/params.py; tests/test_params.py checks that the two
// agree field by field. Tensors are contiguous NCHW; sizes are element counts.
#pragma once

// ---- conv / gemm (conv.metal, gemm.metal) -------------------------------------------------
// (structs of the convolution issue go here)

// ---- other CNN ops (pool.metal, neuron.metal, softmax.metal, loss.metal, dropout.metal,
//      norm.metal, arith.metal, copy.metal) --------------------------------------------------
// (structs of the CNN-ops issue go here)

// ---- recurrent and optimizers (rnn.metal, optimizer.metal) ---------------------------------
// (structs of the recurrent/optimizer issue go here)
