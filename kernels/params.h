// params.h -- every kernel's parameter struct, one per op, in one place (as ggml-metal's
// ggml-metal-impl.h), and every constant that kernels and host code must agree on. Fields are 4
// bytes (uint, int, float) so the layout is the same for Metal, CUDA, C++ and the Python mirror in
// pymetalnn/params.py. The constants are `#define NAME <integer literal>` lines, read by
// pymetalnn/params.py (params.CONST) so the host takes each value from here and nowhere else.
// tests/test_params_header.py checks both: the mirrors field by field, the constants as a kernel
// sees them. Tensors are contiguous NCHW; sizes are element counts.
#pragma once

// ---- shared by several families ------------------------------------------------------------
// Fused activations (the `act` field of Conv2dParams, WinogradParams, GemmParams, NormParams;
// applied by neuron.h's nn_activation).
#define NN_ACT_NONE 0u
#define NN_ACT_RELU 1u
#define NN_ACT_LEAKY_RELU 2u   // alpha = negative_slope
#define NN_ACT_SIGMOID 3u
#define NN_ACT_TANH 4u
// Element streams (stream.h): chunks per thread and threads per block of chunks (not the
// dispatch's threadgroup size). Loops over STREAM_U chunks carry `#pragma unroll 2` (a literal:
// pragma arguments are not macro-expanded alike on every target); change both together.
#define STREAM_U 2u
#define STREAM_TG 256u
// Tiled row reductions (tile_reduce.h; softmax, loss, norm): threads per threadgroup, and the
// floats of row cache per threadgroup (16 KB) of softmax.metal and loss.metal.
#define TR_TG 256
#define SM_CACHE 4096
#define SM_ROW_CHUNKS 8  // softmax.metal row kernels: 16-byte chunks per lane (rows up to 32x that)

// ---- conv / gemm (conv.metal, gemm.metal) -------------------------------------------------
// Conv2dParams: one struct for every conv2d / conv_transpose2d kernel (conv.metal). Geometry is
// always the conv's: x (N, C, H, W) -> y (N, K, OH, OW), weights (K, C/G, KH, KW), where
// conv_transpose2d runs as the input gradient of the conv whose input is its output.
#define CONV_THREADS 256  // threads per threadgroup of every conv.metal kernel
#define CONV_COL2IM_W 16  // dx elements of a row per conv2d_col2im thread (conv_im2col.metal)
struct Conv2dParams {
    uint N, C, H, W;      // conv input
    uint K, OH, OW;       // conv output channels and size
    uint KH, KW;          // kernel size
    uint SH, SW;          // stride
    int PH, PW;           // top / left padding (bottom / right follow from OH, OW)
    uint DH, DW;          // dilation
    uint G, Cg, Kg;       // groups, C / G, K / G
    uint has_bias;        // forward / input-gradient kernels: add b
    uint splits, chunk;   // gradient reductions: partial sums, reduction elements per partial
    uint act;             // forward: fused activation NN_ACT_* (neuron.h), 0 = none
    float act_alpha;      // its scalar (leaky relu: negative_slope)
    uint out_nstride;     // forward: elements between images n of y (0 = contiguous, K*OH*OW);
                          // > 0 writes into a channel slice of a larger NCHW tensor (concat)
};
// WinogradParams (conv_winograd.metal): a 3x3, stride-1 conv x (N, C, H, W) -> y (N, K, OH, OW)
// computed on TH x TW output tiles of M x M (P = N * TH * TW tiles); the input gradient runs as
// such a conv of dy (flip: rotated, transposed weights). Transformed operands are [xi][rows][P]
// matrices, xi < (M + 2)^2.
struct WinogradParams {
    uint N, C, H, W;      // conv input
    uint K, OH, OW;       // conv output channels and size
    uint TH, TW, P;       // output tiles per column / row, tiles in all (N * TH * TW)
    int PT, PL;           // top / left padding (may be negative: the input gradient's crop)
    uint flip;            // filter transform: 1 = input gradient's weights (rot180, C <-> K)
    uint has_bias;        // output transform: add b
    uint act;             // fused activation NN_ACT_* (neuron.h), 0 = none
    float act_alpha;      // its scalar
    uint out_nstride;     // elements between images n of y (0: contiguous), as Conv2dParams
};

// GemmParams (gemm.metal): C = alpha * op(A) op(B) + beta * C (+ bias[n]), op(X) = X or X^T,
// batched; every matrix row-major with the given row pitch.
#define GEMM_THREADS 256u  // threads per threadgroup of every gemm.metal kernel
#define GEMM_TRANS_A 1u    // flags: A is stored K x M (op(A) = A^T)
#define GEMM_TRANS_B 2u    // B is stored N x K (op(B) = B^T)
#define GEMM_VEC_A 4u      // A: rows pitch, batch stride and base allow aligned 4-vector loads
#define GEMM_VEC_B 8u
#define GEMM_VEC_C 16u
#define GEMM_BIAS 32u      // add bias[n]
#define GEMM_BETA 64u      // read C (beta != 0; beta == 0 never reads C, as BLAS)
#define GEMM_VEC8_A 128u   // A: ... aligned 8-vector (16-byte fp16) loads (gemm_mma2's V = 8 tiles)
#define GEMM_VEC8_B 256u
#define GEMM_TRANS_C 512u  // C stored N x M: element (m, n) at n * ldc + m, bias[m] (gemm_blocked and
                           // gemm_splitk_sum only: the host runs a narrow C = op(A) op(B) as
                           // C^T = op(B)^T op(A)^T, so that the blocked tiles' wide side is C's long one)
struct GemmParams {
    uint M, N, K;                       // op(A) is M x K, op(B) is K x N, C is M x N
    uint lda, ldb, ldc;                 // row pitch (elements) of A, B, C as stored
    uint batch;                         // matrices per operand
    uint stride_a, stride_b, stride_c;  // batch strides in elements (0: one matrix for all)
    uint reduce_batch;                  // 1: C = sum over the batch of op(A_i) op(B_i)
    uint k_splits;                      // split-K factor (> 1: partial sums to the workspace)
    uint tiles_m, tiles_n;              // output tiles per matrix (host-computed geometry)
    uint flags;                         // GEMM_* bits (gemm.metal)
    float alpha, beta;
    uint act;                           // fused activation NN_ACT_* (neuron.h) of the result
    float act_alpha;                    // its scalar (leaky relu: negative_slope)
};
// LinearBiasGradParams (gemm.metal): out[n] = sum over r < rows of x[r * cols + n].
struct LinearBiasGradParams {
    uint rows, cols;
};

// ---- other CNN ops (pool.metal, neuron.metal, softmax.metal, loss.metal, dropout.metal,
//      norm.metal, arith.metal, copy.metal) --------------------------------------------------

// -- pool.metal / neuron.metal (pooling and activation family) --
// NeuronParams (neuron.metal): y = f(x) over n elements; a, b are the op's scalars:
// leaky_relu a = negative_slope; elu a = alpha; softplus a = beta, b = threshold;
// hard_sigmoid y = clamp(a x + b, 0, 1); linear_neuron y = a x + b. nvec: 16-byte chunks
// (n / W, W = 4 float or 8 half, when every buffer is 16-byte aligned, else 0: all scalar).
struct NeuronParams {
    uint n, nvec;
    float a, b;
    uint inner;           // elements per image (x_nstride / y_nstride > 0 only)
    uint x_nstride;       // bwd: elements between images of x (or y) as read (0 = contiguous)
    uint y_nstride;       // fwd: elements between images of y as written (0 = contiguous);
                          // nonzero strides: channel slices of a larger NCHW tensor, nvec = 0
};
// Pool2dParams (pool.metal, max/avg pooling): x (N*C planes of IH x IW) -> (OH x OW) per plane.
// Window of output (oh, ow): rows oh*SH - PH + r*DH for r < KH, likewise columns.
// m_X, s_X: magic multiplier and shift dividing by X without a hardware divide (pool.metal's
// magic_div; computed by pymetalnn.ops.pool): out = OH*OW, in = IH*IW, ow = OW, iw = IW, sh = SH, ...
#define POOL_WRITE_INDICES 1u  // flags: max forward also stores the argmax (h * IW + w)
#define POOL_COUNT_PAD 2u      // flags: avg counts padding (count_include_pad)
#define POOL_AVG_ROWS 4        // input rows per thread of avg_pool2d_bwd_const
struct Pool2dParams {
    uint planes;          // N * C
    uint IH, IW, OH, OW;
    int KH, KW, SH, SW, PH, PW, DH, DW;
    uint flags;           // POOL_* bits (pool.metal)
    int divisor;          // avg: divisor_override (nonzero, as torch), 0 = none (bwd_const: any window's)
    uint m_out, s_out, m_in, s_in, m_ow, s_ow, m_iw, s_iw;
    uint m_sh, s_sh, m_sw, s_sw, m_dh, s_dh, m_dw, s_dw;
    uint out_C;           // forward with out_nstride > 0: channels per image (planes = N*out_C)
    uint out_nstride;     // forward: elements between images of y (0 = contiguous); > 0 writes
                          // into a channel slice of a larger NCHW tensor (concat elimination)
    // tiled gradients (avg_pool2d_bwd_const, max_pool2d_bwd_idx_s2x2/_s1x2): one thread per tile
    // of the input plane, tiles_h x tiles_w tiles per plane (m_tw.. divide by them)
    uint tiles_h, tiles_w, m_tw, s_tw, m_th, s_th;
};
// AdaptivePool2dParams (pool.metal): output cell (oh, ow) averages rows
// [floor(oh*IH/OH), ceil((oh+1)*IH/OH)) and likewise columns. m_X, s_X as in Pool2dParams.
struct AdaptivePool2dParams {
    uint planes, IH, IW, OH, OW;
    uint vec;             // global pooling: 1 = planes start 4-vector aligned (vector loads)
    uint m_out, s_out, m_in, s_in, m_ow, s_ow, m_iw, s_iw, m_oh, s_oh, m_ih, s_ih;
};

// -- arith.metal / copy.metal / dropout.metal (arithmetic, shape and dropout family) --
// Arrays of 8 hold per-dimension data of up to 8 merged dimensions (the host merges adjacent
// dimensions that broadcast alike first, so real tensors need far fewer). Index 0 is outermost.
// ArithParams (arith.metal, elementwise): out = op(x0, x1, x2) with broadcasting.
struct ArithParams {
    uint n;            // work items: output elements, or groups of 4 when vec == 4
    uint ndim;         // merged output dimensions
    uint vec;          // 4: the innermost dimension is a multiple of 4, 4 outputs per item
    float alpha;       // factor of the scale op
    uint shape[8];     // merged output dimensions
    uint stride0[8];   // element strides of x0 per output dimension (0 = broadcast)
    uint stride1[8];
    uint stride2[8];
    uint act;          // forward ops: fused activation NN_ACT_* of the result (0 = none)
    float act_alpha;   // its scalar (leaky relu: negative_slope)
};
// ReduceParams (arith.metal): out[t] = alpha * sum over the reduced index space of op(x0, x1, x2).
struct ReduceParams {
    uint n_out;        // outputs (kept index space)
    uint n_red;        // reduced elements per output (inner kernels: rows * inner)
    uint inner;        // inner kernels: length of the contiguous innermost reduced dimension
    uint splits;       // > 1: float partials [splits][n_out], a finish kernel adds them up
    uint chunk;        // reduced elements per split
    uint nk;           // kept dimensions
    uint nr;           // reduced dimensions (inner kernels: excluding the innermost)
    float alpha;       // factor applied to the sum (mean: 1 / count)
    uint vec;          // 4: 4 consecutive elements per load (outer: outputs, inner: reduced)
    uint istride0, istride1, istride2;  // inner kernels: strides of the innermost reduced dim
    uint ksize[8];
    uint kstride0[8];
    uint kstride1[8];
    uint kstride2[8];
    uint rsize[8];
    uint rstride0[8];
    uint rstride1[8];
    uint rstride2[8];
};
// CopyParams (copy.metal): a block of rows x cols elements, src[src_off + r * src_pitch + c] ->
// dst[dst_off + r * dst_pitch + c], converting the storage type.
struct CopyParams {
    uint n;            // work items: elements, or groups of 4 when vec == 4
    uint rows, cols;
    uint vec;          // 4: cols, pitches and offsets are multiples of 4
    uint src_pitch, dst_pitch;
    uint src_off, dst_off;
};
// PermuteParams (copy.metal): out[i] = x[offset of i's coordinates under the permuted strides].
struct PermuteParams {
    uint n;            // work items: elements, or groups of 4 when vec == 4
    uint ndim;
    uint vec;          // 4: the innermost output dimension is x's innermost and a multiple of 4
    uint pad;
    uint shape[8];     // output dimensions (merged)
    uint stride[8];    // x's element stride of each output dimension
};
// TransposeParams (copy.metal): batched x (batch, rows, cols) -> out (batch, cols, rows).
struct TransposeParams {
    uint batch, rows, cols;
    uint tiles_r, tiles_c;  // 32 x 32 tiles per matrix
    uint n_tiles;           // batch * tiles_r * tiles_c
};
// ConcatParams (copy.metal): up to 8 contiguous parts (rows x cols[i]) <-> column blocks of one
// (rows x pitch) matrix at column offsets off[i]: concat gathers the parts, split scatters them.
struct ConcatParams {
    uint n;            // work items over all parts (elements, or groups of 4 when vec == 4)
    uint parts;        // 1..8
    uint rows;
    uint vec;          // 4: every cols[i], off[i] and the pitch are multiples of 4
    uint pitch;        // columns of the joined matrix
    uint start[8];     // first work item of each part
    uint cols[8];
    uint off[8];
};
// DropoutParams (dropout.metal): Philox4x32-10, key = (key0, key1) = the seed, counter =
// (block, 0, ctr2, ctr3) with (ctr2, ctr3) = the offset; drop where the draw < threshold.
struct DropoutParams {
    uint n;            // elements
    uint key0, key1;
    uint ctr2, ctr3;
    uint threshold;    // round(p * 2^32), saturated
    float scale;       // 1 / (1 - p)
    uint inner;        // dropout2d: elements per channel (H * W); 1 otherwise
    uint channels;     // dropout2d: N * C
    uint items;        // work items (threads doing 4 elements each)
    uint vec;          // nvec: 16-byte chunks of the stream.h path (tensors 16-byte aligned), 0: items
};

// -- softmax.metal / loss.metal / norm.metal (softmax, loss and normalization family) --
// SoftmaxParams (softmax.metal; loss.metal's class-axis kernels): x viewed as (outer, len,
// inner), reduced over len. Tiles of W inner positions x S = SW / W slices (tile_reduce.h).
struct SoftmaxParams {
    uint outer, len, inner;
    uint W, SW;        // tile columns (power of two <= 32), threads per tile (W..256)
    uint wblocks;      // ceil(inner / W)
    uint ntiles;       // outer * wblocks
    uint cached;       // 1: a tile's values stay in threadgroup memory between passes
};
// LossParams (loss.metal): input (N, ...) with N samples. Pointwise losses see M elements per
// sample; class-axis losses (cross-entropy, categorical CE, cosine) M positions (H*W) per sample
// and take the class axis's tile plan as a SoftmaxParams.
#define LOSS_G_SCALAR 0u      // gmode: one coefficient g[0]
#define LOSS_G_PER_SAMPLE 1u  // gmode: g[n] per sample
#define LOSS_G_PER_TERM 2u    // gmode: g[i] per term (reduction "none")
struct LossParams {
    uint N;            // samples (dim 0)
    uint M;            // per sample: elements (pointwise) or positions (class-axis)
    uint total;        // pointwise: N * M elements
    uint chunk;        // pointwise forward: elements per threadgroup chunk
    uint chunks;       // pointwise forward: chunks per segment
    uint seglen;       // pointwise forward: elements per segment (M per sample, or total)
    uint ngroups;      // pointwise forward: segments * chunks
    uint reduce;       // forward: 1 = partial sums per chunk, 0 = per-term losses;
                       // pointwise backward (loss_pw_bwd_vec): its 16-byte chunks (nvec)
    uint gmode;        // backward: LOSS_G_*
    uint has_weight;   // per-sample weights given
    int ignore_index;  // class-axis kernels with integer labels
    float smoothing;   // label smoothing
    float a;           // huber: delta; log_loss: epsilon; cosine: eps; kl_div: 1 = log_target;
                       // smooth_l1: beta
    uint elem_weight;  // pointwise: sw holds one weight per element (torch's weight=), not per sample
    uint has_pos_weight;  // bce_with_logits: pw holds one positive-class weight per element
    uint target_grad;  // pointwise backward: also write d loss / d target into dt
    uint has_class_weight;  // class-axis: cw holds one weight per class (torch's weight=)
};
// LossReduceParams (loss.metal): loss_reduce sums `seglen` partials per output; loss_scale
// counts the terms behind a mean and writes g / count for the backward kernels.
#define LOSS_MODE_SUM 0u      // mode: the sum
#define LOSS_MODE_MEAN 1u     // mode: / valid terms
#define LOSS_MODE_NONZERO 2u  // mode: / terms of nonzero weight (0 when there are none)
#define LOSS_MODE_DENOM 3u    // mode: / denom
struct LossReduceParams {
    uint nseg, seglen;
    uint mode;         // LOSS_MODE_*
    float denom;
    uint terms;        // loss_scale: positions scanned
    uint per_sample;   // loss_scale: positions per sample (weight index = k / per_sample)
    uint mult;         // loss_scale: terms each position stands for
    uint has_labels, has_weight;
    int ignore_index;
    uint has_class_weight;  // loss_scale mode 1: count sum_k cw[labels[k]] instead of valid terms
    uint classes;      // loss_scale: labels must lie in [0, classes) (or be ignore_index)
};
// NormParams (norm.metal): input (N, C, HW). Statistics rows are channels (batch norm: a row's
// element e is x[e / HW, c, e % HW]) or (sample, group) pairs (group / instance norm: rows of
// row_len contiguous elements). An element of a row sits at
// (e / inner_len) * outer_stride + row * row_stride + e % inner_len.
struct NormParams {
    uint N, C, HW;
    uint G;            // groups (group norm; C for instance norm)
    uint rows;         // statistics rows: C (batch norm) or N * G
    uint row_len;      // elements per row: N * HW (batch norm) or C / G * HW
    uint inner_len;    // contiguous run of a row: HW (batch norm) or row_len
    uint outer_stride; // between runs: C * HW (batch norm) or 0
    uint row_stride;   // between rows: HW (batch norm) or row_len
    uint chunk;        // row mode: elements per threadgroup chunk
    uint chunks;       // row mode: chunks per row
    uint cols;         // column mode (batch norm, HW < 32): C * HW columns, else 0
    uint col_rows;     // column mode: samples per threadgroup chunk
    uint col_chunks;   // column mode: chunks over N
    uint parts;        // partials per statistics row
    uint planes;       // coefficient sets of the apply kernels: C (batch) or N * C (group)
    uint total;        // N * C * HW
    uint has_weight, has_bias, has_running;
    uint training;     // batch norm: batch statistics (1) or running estimates (0)
    float eps, momentum;
    uint act;          // forward apply: fused activation NN_ACT_* (neuron.h), 0 = none
    float act_alpha;   // its scalar (leaky relu: negative_slope)
    // batch norm only, 0 = contiguous (C * HW). Concat elimination: y written into a channel
    // slice of a larger NCHW tensor, and that tensor's gradient read in place.
    uint out_nstride;  // forward apply: elements between images of y
    uint dy_nstride;   // backward partials and apply: elements between images of dy
};

// LayerNormParams (norm.metal layer_norm_*): rows of D contiguous elements normalized each; a
// threadgroup's TR_TG threads are TR_TG / SW row tiles of SW threads. The weight/bias gradient
// sums rows in `splits` chunks of chunk_rows rows (partials, then one pass over the chunks).
struct LayerNormParams {
    uint rows, D;
    uint SW;           // threads per row: a power of two in [32, 256]
    uint has_weight, has_bias;
    float eps;
    uint splits, chunk_rows;
    uint save_stats;   // backward: also write (mean, 1/std) per row for the parameter gradients
};

// EmbeddingParams (embedding.metal): n indices into a (V, D) table. The backward walks the
// indices sorted by row (perm), one segment per distinct row (seg[s]..seg[s+1]).
struct EmbeddingParams {
    uint n, V, D;
    uint segments;
    uint scale_by_freq;  // divide a row's gradient by its index count (scale_grad_by_freq)
    float max_norm;      // embedding_renorm: rows whose norm_type-norm exceeds it are scaled
    float norm_type;     // p of the p-norm (INFINITY: max |w|)
};

// ---- recurrent and optimizers (rnn.metal, optimizer.metal) ---------------------------------

// -- rnn.metal (LSTM / GRU / RNN cells, pymetalnn/ops/rnn.py) --
// One time step of one layer and direction; sequences are whole time-major buffers and every
// *_off is the element offset of this step's (N, width) block; flags are RNN_*:
#define RNN_HS 1u        // fwd: also write h_t to hs (contiguous (N, H) per step)
#define RNN_SAVE 2u      // fwd: training, save the gate activations
#define RNN_LAST 4u      // fwd: write h_n (and c_n); bwd: write dL/dc_0 instead of the carry
#define RNN_C0 8u        // LSTM: c_{t-1} is c_0 (storage T) rather than the float state
#define RNN_ZERO_C 16u   // LSTM: c_{t-1} = 0 (no initial state given)
#define RNN_DY 32u       // bwd: dy (gradient of y) given
#define RNN_DHR 64u      // bwd: dhr_in given (else the recurrent gradient is 0)
#define RNN_FIRST 128u   // bwd LSTM: first backward step, the dc carry starts from dcn
#define RNN_DCN 256u     // bwd LSTM: dL/dc_n given (else 0)
#define RNN_STAGE 512u   // also write h_t (fwd) / dG_h (bwd) to `stage` (rnn.metal)
// RnnFwdParams: xp (T, N, G*H) input projections, h_t -> y[y_off + n * y_pitch + j] (and hs,
// h_n), LSTM state c (float) from cprev / c0, saved gates (training).
struct RnnFwdParams {
    uint N, H;         // batch, hidden size
    uint flags;
    uint xp_off;
    uint hprev_off;    // GRU: h_{t-1}
    uint cprev_off;    // LSTM: c_{t-1} in the float state
    uint c0_off;       // LSTM: c_{t-1} in c_0 (RNN_C0)
    uint c_off;        // LSTM: c_t
    uint y_off, y_pitch;
    uint hs_off;
    uint gate_off;
    uint hn_off;       // RNN_LAST: h_n (and c_n) block
};
// RnnBwdParams: dh = dy[dy_off + n * dy_pitch + j] + dhr[dhr_off + i]; writes dG at dg_off.
struct RnnBwdParams {
    uint N, H;
    uint flags;
    uint dy_off, dy_pitch;
    uint dhr_off;      // recurrent gradient in
    uint dhr_out_off;  // GRU: direct part z * dh out
    uint dcn_off;      // LSTM: dL/dc_n block (RNN_FIRST)
    uint dc0_off;      // LSTM: dL/dc_0 block (RNN_LAST)
    uint gate_off;
    uint c_off, cprev_off, c0_off;  // LSTM: c_t, c_{t-1} (float state or c_0)
    uint hprev_off;    // GRU: h_{t-1}
    uint h_off;        // RNN: h_t
    uint dg_off;
};

// -- optimizer.metal (pymetalnn.optim) --
// OptimParams: what every update kernel (ours and a CustomOptimizer's) gets, one per parameter
// tensor: MPS's optimizer descriptor plus torch's maximize. The gradient a rule sees is
// g' = clamp(g * grad_rescale * clip_coef, clip_min, clip_max), negated if maximize, plus
// reg_scale * sign(w) (L1) or reg_scale * w (L2); clip_coef = min(1, max_norm / (norm + 1e-6))
// with norm = sqrt(gnorm[0]), the global norm over every rescaled gradient of the optimizer.
struct OptimParams {
    uint n;            // elements of this tensor
    uint vec4;         // 1: every buffer is 16-byte aligned, 4-wide loads allowed
    uint step;         // this tensor's step count, this step included (1 on the first)
    float lr;
    float grad_rescale;
    uint clip_value;   // 1: clamp to [clip_min, clip_max]
    float clip_min, clip_max;
    uint clip_norm;    // 1: scale by clip_coef (gnorm[0] holds the sum of squares)
    float max_norm;
    uint reg_type;     // 0 none, 1 L1, 2 L2
    float reg_scale;
    uint maximize;
    uint step_index;   // this tensor's slot in the optimizer's device step counters (steps[])
};
// OptimNormParams (optim_sumsq): gnorm[0] += sum over i < n of (scale * x[i])^2.
struct OptimNormParams {
    uint n;
    float scale;
};
// OptimChunk: one row of a multi-tensor update's chunk table (<rule>_step_multi, a device
// buffer of rows, one threadgroup each): element offsets of the chunk's first element in the
// params, grads and state base buffers, its length (<= OPTIM_CHUNK) and whether all three are
// 16-byte aligned (4-wide loads), and the tensor's slot in the device step counters.
#define OPTIM_CHUNK 16384u
#define OPTIM_CHUNK_WORDS 6u
struct OptimChunk {
    uint param_off;
    uint grad_off;
    uint state_off;
    uint n;
    uint vec4;
    uint step_index;
};
// OptimCountParams (optim_count): steps[first .. first + n) += 1 unless the step is skipped
// (amp[AMP_FOUND_INF] != 0). The device step counters are what the rules read their step t from,
// so a recorded step replayed advances them exactly as an encoded one.
struct OptimCountParams {
    uint first;
    uint n;
};
// The loss-scaling state of a mixed-precision graph (one float4 buffer, `amp` in the update
// kernels; {1, 1, 0, 0} without loss scaling): the scale, its inverse (the gradients' unscale
// factor), whether this step's gradients hold an inf/NaN (1: every update of the step is
// skipped), and the clean steps since the scale last changed (GradScaler's growth tracker).
#define AMP_SCALE 0
#define AMP_INV_SCALE 1
#define AMP_FOUND_INF 2
#define AMP_TRACKER 3
// AmpParams (amp_* kernels in optimizer.metal): torch.cuda.amp.GradScaler's update rule.
struct AmpParams {
    uint n;                // amp_check: elements; amp_seed: loss-gradient elements
    float growth_factor;
    float backoff_factor;
    uint growth_interval;
    float base;            // amp_seed: the unscaled loss-gradient value (1 / N for a mean)
};
// SGDParams (sgd_step): torch.optim.SGD; host-side constants precomputed in double.
struct SGDParams {
    float momentum;
    float one_minus_dampening;
    uint nesterov;
    uint first_step;   // 1: the momentum buffer starts as the gradient (torch's clone)
    float weight_decay;
};
// AdamParams (adam_step): torch.optim.Adam / AdamW. The bias corrections 1 - beta^t are
// computed by the kernel from the device step count t as -expm1(t * log(beta)) (log(beta) from
// the host in double), so a replayed step uses the step it runs at.
struct AdamParams {
    float one_minus_beta1;  // lerp weight of exp_avg
    float beta2, one_minus_beta2;
    float eps;
    float weight_decay;     // Adam's L2 term (0 for AdamW)
    float decay;            // AdamW's w *= 1 - lr * weight_decay (1 for Adam)
    float lr;
    float log_beta1, log_beta2;  // log(beta) (-inf for beta = 0: 1 - beta^t = 1)
    uint amsgrad;
};
// RMSPropParams (rmsprop_step): torch.optim.RMSprop.
struct RMSPropParams {
    float alpha, one_minus_alpha;
    float eps;
    float momentum;
    uint centered;
    float weight_decay;
};
// YoloParams (detection.metal): YOLO v2 over x (N, A*(5+C), GH, GW) and targets (N, B, 5).
#define YOLO_MAXB 256  // B at most: a sample's target rows are cached in threadgroup memory
struct YoloParams {
    uint N, A, C, GH, GW;
    uint B;                // target rows per sample
    uint gmode;            // backward: 0 = one coefficient g[0], 1 = per sample g[n]
    uint rescore;          // objectness target: 1 = IoU with the box, 0 = 1
    float gscale;          // backward: the coefficient's multiplier (1 / N for a mean)
    float coord_scale, object_scale, noobject_scale, class_scale;
    float ignore_thresh;   // no no-object term above this best IoU
};
// NmsParams (nms_fwd_float): greedy NMS over N samples x C classes of P predictions each.
struct NmsParams {
    uint N, C, P;
    uint max_det;
    float iou_thresh, score_thresh;
};
