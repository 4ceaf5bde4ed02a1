// gemm_cpu.metal -- numbered versions of gemm.metal's blocked cpu kernel (gemm_blocked), timed
// against it by benchmarks/dev_gemm.py --versions cpu (cpu backend):
//   v1  op(A) copied k-major ([BK][TM]) per BK slice unless stored K x M, B read in place where
//       its rows hold a thread's columns; 8 x 32 blocks only (kept below as gemm_blocked_v1)
//   v2  (gemm.metal, current) op(A) copied TM-major ([TM][BK]: each row a contiguous run) and
//       read in place with no copy where it is stored M x K and the block and slice are whole;
//       column loops under the vectorize hint (g++ peels 16-iteration loops completely before
//       its vectorizer sees them); 6 x 16 blocks besides 8 x 32 (12 accumulator vectors fit
//       AVX2's 16 registers, 8 x 32's 32 spill there)
#include "gemm.metal"

template <typename T, typename ACC, typename TC, int TM, int TN, int TX, int BK>
[[max_total_threads_per_threadgroup(256)]]
kernel void gemm_blocked_v1(device const T* A [[buffer(0)]], device const T* B [[buffer(1)]],
                         device TC* C [[buffer(2)]], device const T* bias [[buffer(3)]],
                         constant GemmParams& p [[buffer(4)]],
                         uint tid [[thread_position_in_threadgroup]],
                         uint group [[threadgroup_position_in_grid]]) {
    constexpr uint BM = (256u / uint(TX)) * uint(TM), BN = uint(TX) * uint(TN);
    uint tiles = p.tiles_m * p.tiles_n;
    uint nb = p.reduce_batch ? 1u : p.batch;
    uint tile = group % tiles, rest = group / tiles;
    uint bo = rest % nb, split = rest / nb;
    uint width = GEMM_GROUP_M * p.tiles_n;
    uint first = (tile / width) * GEMM_GROUP_M;
    uint gsize = min(p.tiles_m - first, GEMM_GROUP_M);
    uint mt = (first + (tile % width) % gsize) * BM + uint(TM) * (tid / uint(TX));
    uint nt = ((tile % width) / gsize) * BN + uint(TN) * (tid % uint(TX));
    if (mt >= p.M || nt >= p.N) return;

    uint kt_n = (p.K + uint(BK) - 1u) / uint(BK);
    ulong total = (ulong)kt_n * (p.reduce_batch ? p.batch : 1u);
    uint t0 = uint((ulong)split * total / p.k_splits);
    uint t1 = uint((ulong)(split + 1u) * total / p.k_splits);
    uint b = p.reduce_batch ? t0 / kt_n : bo;
    uint kt = t0 % kt_n;
    bool rca = (p.flags & GEMM_TRANS_A) != 0u;   // A^T stored: contiguous along m
    bool rcb = (p.flags & GEMM_TRANS_B) == 0u;   // B stored K x N: contiguous along n
    bool full_m = mt + uint(TM) <= p.M, full_n = nt + uint(TN) <= p.N;

    ACC acc[TM][TN];
    for (int i = 0; i < TM; ++i) {
        for (int j = 0; j < TN; ++j) acc[i][j] = ACC(0);
    }
    // Rows past M and columns past N are never stored: only the valid ones are copied (tiny
    // N, as a 2x2 plane's conv, would otherwise copy 32 clamped columns to use a few), the
    // rest stay 0 from here
    const uint mv = min(uint(TM), p.M - mt), nv = min(uint(TN), p.N - nt);
    ACC as[BK][TM];
    ACC bs[BK][TN];
    for (int kk = 0; kk < BK; ++kk) {
        for (int i = 0; i < TM; ++i) as[kk][i] = ACC(0);
        for (int j = 0; j < TN; ++j) bs[kk][j] = ACC(0);
    }
    for (uint t = t0; t < t1; ++t) {
        device const T* Ab = A + (ulong)b * p.stride_a;
        device const T* Bb = B + (ulong)b * p.stride_b;
        uint k0 = kt * uint(BK);
        uint kn = min(uint(BK), p.K - k0);
        // B in place where its rows hold the thread's TN columns; the BK-step loops (constant
        // trip count: unrolled) take whole slices, a short one (K % BK, or the few terms per
        // batch entry of a weight gradient) runs its kn steps
        bool direct = rcb && full_n && kn == uint(BK);
        // op(A) stored K x M (A^T) holds the thread's TM rows contiguously as well: both
        // operands are then read in place (each A value broadcast from memory into its row's
        // FMAs), with no copy at all
        bool direct_a = direct && rca && full_m;
        for (uint kk = 0; kk < (direct_a ? 0u : kn); ++kk) {
            uint k = k0 + kk;
            // whole blocks keep constant trip counts (unrolled, vectorized copies)
            if (full_m) {
                for (int i = 0; i < TM; ++i) as[kk][i] = gemm_at(Ab, rca, p.lda, mt + uint(i), k);
            } else {
                for (uint i = 0; i < mv; ++i) as[kk][i] = gemm_at(Ab, rca, p.lda, mt + i, k);
            }
            if (!rcb && !(full_n && kn == uint(BK))) {
                for (uint j = 0; j < nv; ++j) bs[kk][j] = gemm_at(Bb, rcb, p.ldb, nt + j, k);
            }
        }
        if (!rcb && full_n && kn == uint(BK)) {
            // B^T stored: each of the thread's columns is a run of BK consecutive values; read
            // run by run (one cache line each) rather than one value of TN rows per step
            // (ResNet-18's 2x2-plane forward, 512 x 4 x 4608 at batch 2, run transposed:
            // 2.7 -> 1.3 ms on the 2-core test box)
            for (int j = 0; j < TN; ++j) {
                device const T* bp = Bb + (nt + uint(j)) * p.ldb + k0;
                for (int kk = 0; kk < BK; ++kk) bs[kk][j] = ACC(bp[kk]);
            }
        }
        // a short slice's rest: 0 (the in-place paths run only its kn steps)
        for (uint kk = kn; kk < (rcb ? 0u : uint(BK)); ++kk) {
            for (int i = 0; i < TM; ++i) as[kk][i] = ACC(0);
            for (int j = 0; j < TN; ++j) bs[kk][j] = ACC(0);
        }
        if (direct_a) {
            device const T* arow = Ab + k0 * p.lda + mt;
            device const T* brow = Bb + k0 * p.ldb + nt;
            for (int kk = 0; kk < BK; ++kk) {
                for (int i = 0; i < TM; ++i) {
                    const ACC av = ACC(arow[i]);
                    for (int j = 0; j < TN; ++j) acc[i][j] = fma(av, ACC(brow[j]), acc[i][j]);
                }
                arow += p.lda;
                brow += p.ldb;
            }
        } else if (direct) {  // B's rows read in place: the accumulators stay in registers
            device const T* brow = Bb + k0 * p.ldb + nt;
            for (int kk = 0; kk < BK; ++kk) {
                for (int i = 0; i < TM; ++i) {
                    for (int j = 0; j < TN; ++j) {
                        acc[i][j] = fma(as[kk][i], ACC(brow[j]), acc[i][j]);
                    }
                }
                brow += p.ldb;
            }
        } else if (rcb) {  // a short slice or a block past N: B's rows in place, valid columns
            device const T* brow = Bb + k0 * p.ldb + nt;
            for (uint kk = 0; kk < kn; ++kk) {
                ACC bk[TN];
                for (int j = 0; j < TN; ++j) bk[j] = uint(j) < nv ? ACC(brow[j]) : ACC(0);
                for (int i = 0; i < TM; ++i) {
                    for (int j = 0; j < TN; ++j) acc[i][j] = fma(as[kk][i], bk[j], acc[i][j]);
                }
                brow += p.ldb;
            }
        } else {
            for (int kk = 0; kk < BK; ++kk) {
                for (int i = 0; i < TM; ++i) {
                    for (int j = 0; j < TN; ++j) acc[i][j] = fma(as[kk][i], bs[kk][j], acc[i][j]);
                }
            }
        }
        if (++kt == kt_n) {
            kt = 0;
            ++b;
        }
    }

    device TC* c0 = C + (ulong)(split * nb + bo) * p.stride_c;
    if (p.flags & GEMM_TRANS_C) {
        // C^T stored (the caller's columns are these rows): one element at a time, the order
        // of operations of the other epilogues
        const bool has_bias = (p.flags & GEMM_BIAS) != 0u, has_beta = (p.flags & GEMM_BETA) != 0u;
        for (uint i = 0; i < mv; ++i) {
            for (uint j = 0; j < nv; ++j) {
                device TC* c = c0 + (nt + j) * p.ldc + mt + i;
                float v = p.alpha * float(acc[i][j]);
                if (has_bias) v += float(bias[mt + i]);
                if (has_beta) v += p.beta * float(*c);
                *c = TC(nn_activation(v, p.act, p.act_alpha));
            }
        }
        return;
    }
    if (full_m && full_n) {
        // a whole block: the epilogue's per-quad branches (bias, beta, vector alignment, the
        // activation switch) hoisted out of the element loops, which then vectorize; at K = 64
        // the quad-by-quad epilogue cost as much as the FMAs. The same operations in the same
        // order as gemm_store_quad: bitwise its results.
        const bool has_bias = (p.flags & GEMM_BIAS) != 0u, has_beta = (p.flags & GEMM_BETA) != 0u;
        for (int i = 0; i < TM; ++i) {
            device TC* crow = c0 + (mt + uint(i)) * p.ldc + nt;
            if (!has_bias && !has_beta && p.act == NN_ACT_NONE) {
                for (int j = 0; j < TN; ++j) crow[j] = TC(p.alpha * float(acc[i][j]));
            } else {
                for (int j = 0; j < TN; ++j) {
                    float v = p.alpha * float(acc[i][j]);
                    if (has_bias) v += float(bias[nt + uint(j)]);
                    if (has_beta) v += p.beta * float(crow[j]);
                    crow[j] = TC(nn_activation(v, p.act, p.act_alpha));
                }
            }
        }
        return;
    }
    bool vc = (p.flags & GEMM_VEC_C) != 0u;
    for (int i = 0; i < TM; ++i) {
        uint m = mt + uint(i);
        if (m >= p.M) break;
        for (int j = 0; j < TN; j += 4) {
            uint n = nt + uint(j);
            if (n >= p.N) break;
            gemm_store_quad<TC, ACC, T>(c0 + m * p.ldc + n, bias, p.alpha, p.beta, p.flags, p.N,
                                        vec<ACC, 4>(acc[i][j], acc[i][j + 1], acc[i][j + 2],
                                                    acc[i][j + 3]), n, vc, p.act, p.act_alpha);
        }
    }
}

#define GEMM_CPU_V1(TILE, TM, TN, TX, BK) \
    GEMM_KERNEL(gemm_fwd_##TILE##_float, gemm_blocked_v1, float, float, float, TM, TN, TX, BK)
GEMM_CPU_V1(cpu512x128v1, 8, 32, 4, 16)
GEMM_CPU_V1(cpu128x512v1, 8, 32, 16, 16)
GEMM_CPU_V1(cpu384x64v1, 6, 16, 4, 16)
GEMM_CPU_V1(cpu96x256v1, 6, 16, 16, 16)
