// rnn.metal -- the fused per-step cells of the recurrent layers (pymetalnn/ops/rnn.py): LSTM,
// GRU and Elman RNN (tanh / relu), forward and backward through time.
//
// Design note
// -----------
// A recurrent layer is two kinds of work. The matrix products (x W_ih^T for all T steps at
// once before the loop, h_{t-1} W_hh^T once per step, and in backward dG_t W_hh per step plus
// the weight gradients as one product over all steps) go to gemm.metal. What is left per step
// -- the gate nonlinearities and the state update -- is element-wise over the N x H hidden
// units and is ONE kernel per step here: thread (n, j) reads the G gate pre-activations of
// unit j (G = 4 LSTM, 3 GRU, 1 RNN; columns g*H + j of the step's (N, G*H) rows, so a SIMD-group
// reads G runs of 32 consecutive values), does all the cell's arithmetic in registers and
// writes h (and c) once. These kernels are memory-bound and tiny (N*H threads); the point of
// fusing is that a step is 2 launches forward (gemm + cell) and 2 backward, not ~10.
//
// * Inputs: xp = x W_ih^T + b_ih (all steps, from the big gemm) and hp = h_{t-1} W_hh^T + b_hh
//   (this step's gemm) are kept apart because GRU needs r * (W_hn h + b_hn) on its own.
// * Buffers are whole sequences addressed with element offsets from RnnFwdParams /
//   RnnBwdParams (no per-step views needed for these kernels). y is the layer output
//   (T, N, D*H): this direction writes columns [d*H, (d+1)*H) with row pitch D*H. With two
//   directions y is not contiguous per direction, so h_t also goes to hs (T, N, H), the
//   operand of dW_hh's gemm and what the GRU / RNN backward cells read back.
// * Training saves what backward needs, as activations (cheaper to differentiate than the
//   pre-activations): LSTM i, f, g, o and c_t (float), GRU r, z, n and W_hn h + b_hn; RNN saves
//   nothing extra (tanh' = 1 - h^2, relu' = [h > 0] come from h_t itself).
// * Precision: storage T (float or half); everything is computed in float; the LSTM cell state
//   is kept in float between steps (the "cell accumulates in float"), its carry dL/dc too;
//   c_0 / c_n / dL/dc_0 / dL/dc_n are T at the API. precise:: math: sigmoid and tanh saturate
//   correctly for any finite input (exp overflow gives 1 / inf = 0).
// * Backward, per step in reverse processing order: dh = dy_t + dhr, where dhr (the recurrent
//   part, dG_{t+1} W_hh from the previous backward gemm, or dL/dh_n at the first step) is read
//   from dhr_in. The kernel writes the pre-activation gradients dG_t (GRU: dG_x for W_ih and
//   dG_h for W_hh, which differ by r in the n block) and, for GRU, the direct part z * dh of
//   dL/dh_{t-1} to dhr_out; the host's gemm then adds dG_h W_hh into dhr_out (beta = 1 for
//   GRU, beta = 0 otherwise).
// * RNN_STAGE: the cell also writes h_t (backward: dG_h) to `stage`, one fixed (N, width)
//   buffer, so the host's per-step gemm has the same operands every step and can be replayed
//   from a captured recording instead of being re-planned from Python (ops/rnn.py). Reuse of
//   the one buffer is safe: launches run in order, and the gemm reading step t's copy finishes
//   before the cell of the next step overwrites it.
// * Grid: any N*H (grid-stride loop; the host caps the grid).
#include <metal_stdlib>
#include "params.h"
#include "instantiate.h"
using namespace metal;

// RnnFwdParams.flags / RnnBwdParams.flags: RNN_* in params.h. RNN_STAGE's `stage` is the fixed
// operand of the per-step gemm that the host replays from a captured recording.

inline float rnn_sigmoid(float x) { return 1.0f / (1.0f + precise::exp(-x)); }

// c_{t-1} of unit i: from the float state, from c_0 (T), or 0.
template <typename T>
inline float rnn_cprev(device const float* cprev, device const T* c0, uint off, uint c0_off,
                       uint flags, uint i) {
    if (flags & RNN_ZERO_C) return 0.0f;
    if (flags & RNN_C0) return float(c0[c0_off + i]);
    return cprev[off + i];
}

// ---- LSTM --------------------------------------------------------------------------------
// a = xp + hp; i, f, o = sigmoid, g = tanh; c = f c_{t-1} + i g; h = o tanh(c).
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void lstm_fwd(device const T* xp [[buffer(0)]], device const T* hp [[buffer(1)]],
                     device const float* cprev [[buffer(2)]], device const T* c0 [[buffer(3)]],
                     device float* c [[buffer(4)]], device T* y [[buffer(5)]],
                     device T* hs [[buffer(6)]], device T* gates [[buffer(7)]],
                     device T* hn [[buffer(8)]], device T* cn [[buffer(9)]],
                     device T* stage [[buffer(10)]], constant RnnFwdParams& p [[buffer(11)]],
                     uint gid [[thread_position_in_grid]],
                     uint tpg [[threads_per_threadgroup]],
                     uint groups [[threadgroups_per_grid]]) {
    const uint H = p.H, NH = p.N * p.H;
    for (uint i = gid; i < NH; i += tpg * groups) {
        uint n = i / H, j = i - n * H;
        uint r = n * 4u * H + j;  // unit j's i-gate column in this step's (N, 4H) rows
        float ai = float(xp[p.xp_off + r]) + float(hp[r]);
        float af = float(xp[p.xp_off + r + H]) + float(hp[r + H]);
        float ag = float(xp[p.xp_off + r + 2u * H]) + float(hp[r + 2u * H]);
        float ao = float(xp[p.xp_off + r + 3u * H]) + float(hp[r + 3u * H]);
        float gi = rnn_sigmoid(ai), gf = rnn_sigmoid(af), gg = precise::tanh(ag);
        float go = rnn_sigmoid(ao);
        float cp = rnn_cprev(cprev, c0, p.cprev_off, p.c0_off, p.flags, i);
        float cc = gf * cp + gi * gg;
        float h = go * precise::tanh(cc);
        c[p.c_off + i] = cc;
        y[p.y_off + n * p.y_pitch + j] = T(h);
        if (p.flags & RNN_HS) hs[p.hs_off + i] = T(h);
        if (p.flags & RNN_STAGE) stage[i] = T(h);
        if (p.flags & RNN_SAVE) {
            uint s = p.gate_off + r;
            gates[s] = T(gi);
            gates[s + H] = T(gf);
            gates[s + 2u * H] = T(gg);
            gates[s + 3u * H] = T(go);
        }
        if (p.flags & RNN_LAST) {
            hn[p.hn_off + i] = T(h);
            cn[p.hn_off + i] = T(cc);
        }
    }
}

// dh = dy + dhr; dc = dc_carry + dh o (1 - tanh(c)^2);
// dG = [dc g i(1-i), dc c_{t-1} f(1-f), dc i (1-g^2), dh tanh(c) o(1-o)]; dc_carry' = dc f.
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void lstm_bwd(device const T* dy [[buffer(0)]], device const T* dhr [[buffer(1)]],
                     device float* dc [[buffer(2)]], device const T* dcn [[buffer(3)]],
                     device T* dc0 [[buffer(4)]], device const T* gates [[buffer(5)]],
                     device const float* c [[buffer(6)]], device const float* cprev [[buffer(7)]],
                     device const T* c0 [[buffer(8)]], device T* dg [[buffer(9)]],
                     device T* stage [[buffer(10)]], constant RnnBwdParams& p [[buffer(11)]],
                     uint gid [[thread_position_in_grid]],
                     uint tpg [[threads_per_threadgroup]],
                     uint groups [[threadgroups_per_grid]]) {
    const uint H = p.H, NH = p.N * p.H;
    for (uint i = gid; i < NH; i += tpg * groups) {
        uint n = i / H, j = i - n * H;
        uint r = n * 4u * H + j;
        float dh = 0.0f;
        if (p.flags & RNN_DY) dh += float(dy[p.dy_off + n * p.dy_pitch + j]);
        if (p.flags & RNN_DHR) dh += float(dhr[p.dhr_off + i]);
        float dcc;
        if (p.flags & RNN_FIRST) {
            dcc = (p.flags & RNN_DCN) ? float(dcn[p.dcn_off + i]) : 0.0f;
        } else {
            dcc = dc[i];
        }
        uint s = p.gate_off + r;
        float gi = float(gates[s]), gf = float(gates[s + H]);
        float gg = float(gates[s + 2u * H]), go = float(gates[s + 3u * H]);
        float tc = precise::tanh(c[p.c_off + i]);
        float cp = rnn_cprev(cprev, c0, p.cprev_off, p.c0_off, p.flags, i);
        dcc += dh * go * (1.0f - tc * tc);
        T d0 = T(dcc * gg * gi * (1.0f - gi)), d1 = T(dcc * cp * gf * (1.0f - gf));
        T d2 = T(dcc * gi * (1.0f - gg * gg)), d3 = T(dh * tc * go * (1.0f - go));
        uint o = p.dg_off + r;
        dg[o] = d0;
        dg[o + H] = d1;
        dg[o + 2u * H] = d2;
        dg[o + 3u * H] = d3;
        if (p.flags & RNN_STAGE) {
            stage[r] = d0;
            stage[r + H] = d1;
            stage[r + 2u * H] = d2;
            stage[r + 3u * H] = d3;
        }
        float dcp = dcc * gf;
        if (p.flags & RNN_LAST) {
            dc0[p.dc0_off + i] = T(dcp);
        } else {
            dc[i] = dcp;
        }
    }
}

// ---- GRU ---------------------------------------------------------------------------------
// r = sigmoid(xp_r + hp_r), z = sigmoid(xp_z + hp_z), n = tanh(xp_n + r hp_n),
// h = (1 - z) n + z h_{t-1}; saved: r, z, n, hp_n.
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void gru_fwd(device const T* xp [[buffer(0)]], device const T* hp [[buffer(1)]],
                    device const T* hprev [[buffer(2)]], device T* y [[buffer(3)]],
                    device T* hs [[buffer(4)]], device T* gates [[buffer(5)]],
                    device T* hn [[buffer(6)]], device T* stage [[buffer(7)]],
                    constant RnnFwdParams& p [[buffer(8)]],
                    uint gid [[thread_position_in_grid]],
                    uint tpg [[threads_per_threadgroup]],
                    uint groups [[threadgroups_per_grid]]) {
    const uint H = p.H, NH = p.N * p.H;
    for (uint i = gid; i < NH; i += tpg * groups) {
        uint n = i / H, j = i - n * H;
        uint r = n * 3u * H + j;
        float gr = rnn_sigmoid(float(xp[p.xp_off + r]) + float(hp[r]));
        float gz = rnn_sigmoid(float(xp[p.xp_off + r + H]) + float(hp[r + H]));
        float hpn = float(hp[r + 2u * H]);
        float gn = precise::tanh(float(xp[p.xp_off + r + 2u * H]) + gr * hpn);
        float h = (1.0f - gz) * gn + gz * float(hprev[p.hprev_off + i]);
        y[p.y_off + n * p.y_pitch + j] = T(h);
        if (p.flags & RNN_HS) hs[p.hs_off + i] = T(h);
        if (p.flags & RNN_STAGE) stage[i] = T(h);
        if (p.flags & RNN_SAVE) {
            uint s = p.gate_off + n * 4u * H + j;  // saved rows are (N, 4H): r, z, n, hp_n
            gates[s] = T(gr);
            gates[s + H] = T(gz);
            gates[s + 2u * H] = T(gn);
            gates[s + 3u * H] = T(hpn);
        }
        if (p.flags & RNN_LAST) hn[p.hn_off + i] = T(h);
    }
}

// dh = dy + dhr; dn = dh (1-z) (1-n^2); dz = dh (h_{t-1} - n) z (1-z); dr = dn hp_n r (1-r);
// dG_x = [dr, dz, dn], dG_h = [dr, dz, dn r]; dhr_out = dh z (the gemm adds dG_h W_hh).
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void gru_bwd(device const T* dy [[buffer(0)]], device const T* dhr [[buffer(1)]],
                    device T* dhr_out [[buffer(2)]], device const T* gates [[buffer(3)]],
                    device const T* hprev [[buffer(4)]], device T* dgx [[buffer(5)]],
                    device T* dgh [[buffer(6)]], device T* stage [[buffer(7)]],
                    constant RnnBwdParams& p [[buffer(8)]],
                    uint gid [[thread_position_in_grid]],
                    uint tpg [[threads_per_threadgroup]],
                    uint groups [[threadgroups_per_grid]]) {
    const uint H = p.H, NH = p.N * p.H;
    for (uint i = gid; i < NH; i += tpg * groups) {
        uint n = i / H, j = i - n * H;
        float dh = 0.0f;
        if (p.flags & RNN_DY) dh += float(dy[p.dy_off + n * p.dy_pitch + j]);
        if (p.flags & RNN_DHR) dh += float(dhr[p.dhr_off + i]);
        uint s = p.gate_off + n * 4u * H + j;
        float gr = float(gates[s]), gz = float(gates[s + H]);
        float gn = float(gates[s + 2u * H]), hpn = float(gates[s + 3u * H]);
        float hp = float(hprev[p.hprev_off + i]);
        float dn = dh * (1.0f - gz) * (1.0f - gn * gn);
        float dz = dh * (hp - gn) * gz * (1.0f - gz);
        float dr = dn * hpn * gr * (1.0f - gr);
        uint r = n * 3u * H + j, o = p.dg_off + r;
        dgx[o] = T(dr);
        dgx[o + H] = T(dz);
        dgx[o + 2u * H] = T(dn);
        dgh[o] = T(dr);
        dgh[o + H] = T(dz);
        dgh[o + 2u * H] = T(dn * gr);
        if (p.flags & RNN_STAGE) {
            stage[r] = T(dr);
            stage[r + H] = T(dz);
            stage[r + 2u * H] = T(dn * gr);
        }
        dhr_out[p.dhr_out_off + i] = T(dh * gz);
    }
}

// ---- Elman RNN ---------------------------------------------------------------------------
struct RnnTanh {
    static float fwd(float a) { return precise::tanh(a); }
    static float bwd(float h) { return 1.0f - h * h; }   // from the output h = tanh(a)
};
struct RnnRelu {
    static float fwd(float a) { return max(a, 0.0f); }
    static float bwd(float h) { return h > 0.0f ? 1.0f : 0.0f; }  // torch: relu'(0) = 0
};

// h = act(xp + hp)
template <typename T, typename Act>
[[max_total_threads_per_threadgroup(256)]]
kernel void rnn_fwd(device const T* xp [[buffer(0)]], device const T* hp [[buffer(1)]],
                    device T* y [[buffer(2)]], device T* hs [[buffer(3)]],
                    device T* hn [[buffer(4)]], device T* stage [[buffer(5)]],
                    constant RnnFwdParams& p [[buffer(6)]],
                    uint gid [[thread_position_in_grid]],
                    uint tpg [[threads_per_threadgroup]],
                    uint groups [[threadgroups_per_grid]]) {
    const uint H = p.H, NH = p.N * p.H;
    for (uint i = gid; i < NH; i += tpg * groups) {
        uint n = i / H, j = i - n * H;
        float h = Act::fwd(float(xp[p.xp_off + i]) + float(hp[i]));
        y[p.y_off + n * p.y_pitch + j] = T(h);
        if (p.flags & RNN_HS) hs[p.hs_off + i] = T(h);
        if (p.flags & RNN_STAGE) stage[i] = T(h);
        if (p.flags & RNN_LAST) hn[p.hn_off + i] = T(h);
    }
}

// dG = (dy + dhr) act'(h_t), with h_t read back as stored (hs or y, pitch H).
template <typename T, typename Act>
[[max_total_threads_per_threadgroup(256)]]
kernel void rnn_bwd(device const T* dy [[buffer(0)]], device const T* dhr [[buffer(1)]],
                    device const T* h [[buffer(2)]], device T* dg [[buffer(3)]],
                    device T* stage [[buffer(4)]], constant RnnBwdParams& p [[buffer(5)]],
                    uint gid [[thread_position_in_grid]],
                    uint tpg [[threads_per_threadgroup]],
                    uint groups [[threadgroups_per_grid]]) {
    const uint H = p.H, NH = p.N * p.H;
    for (uint i = gid; i < NH; i += tpg * groups) {
        uint n = i / H, j = i - n * H;
        float dh = 0.0f;
        if (p.flags & RNN_DY) dh += float(dy[p.dy_off + n * p.dy_pitch + j]);
        if (p.flags & RNN_DHR) dh += float(dhr[p.dhr_off + i]);
        T g = T(dh * Act::bwd(float(h[p.h_off + i])));
        dg[p.dg_off + i] = g;
        if (p.flags & RNN_STAGE) stage[i] = g;
    }
}

// ---- instantiations: <cell>_<fwd|bwd>[_act]_<dtype> ---------------------------------------
INSTANTIATE("lstm_fwd_float", lstm_fwd, float)
INSTANTIATE("lstm_fwd_half", lstm_fwd, half)
INSTANTIATE("lstm_bwd_float", lstm_bwd, float)
INSTANTIATE("lstm_bwd_half", lstm_bwd, half)
INSTANTIATE("gru_fwd_float", gru_fwd, float)
INSTANTIATE("gru_fwd_half", gru_fwd, half)
INSTANTIATE("gru_bwd_float", gru_bwd, float)
INSTANTIATE("gru_bwd_half", gru_bwd, half)
INSTANTIATE("rnn_fwd_tanh_float", rnn_fwd, float, RnnTanh)
INSTANTIATE("rnn_fwd_tanh_half", rnn_fwd, half, RnnTanh)
INSTANTIATE("rnn_fwd_relu_float", rnn_fwd, float, RnnRelu)
INSTANTIATE("rnn_fwd_relu_half", rnn_fwd, half, RnnRelu)
INSTANTIATE("rnn_bwd_tanh_float", rnn_bwd, float, RnnTanh)
INSTANTIATE("rnn_bwd_tanh_half", rnn_bwd, half, RnnTanh)
INSTANTIATE("rnn_bwd_relu_float", rnn_bwd, float, RnnRelu)
INSTANTIATE("rnn_bwd_relu_half", rnn_bwd, half, RnnRelu)
