// detection.metal -- the YOLO v2 (region layer) loss with its fused gradient, box decoding and
// greedy non-maximum suppression.
//
// Layout. The network's output x is (N, A*(5+C), GH, GW): for anchor a, channels
// a*(5+C) + (tx, ty, tw, th, to, class logits...). A prediction p = (a*GH + i)*GW + j is one
// anchor at one cell. Its box, in image-relative units [0, 1]:
//   cx = (j + sigmoid(tx)) / GW, cy = (i + sigmoid(ty)) / GH,
//   w = anchor_w exp(tw) / GW,   h = anchor_h exp(th) / GH      (anchors in grid cells)
// and its objectness is sigmoid(to). Targets are (N, B, 5) rows (class, cx, cy, w, h), class -1
// marking an empty row.
//
// Loss of one sample (Darknet's region layer, squared errors, softmax cross-entropy classes):
//  * each target box b is assigned to the cell holding its centre and to the anchor whose shape
//    best matches it (IoU of boxes sharing a corner; lowest anchor on ties); when several boxes
//    share a (cell, anchor), the last one wins (Darknet overwrites in box order);
//  * the responsible prediction of box b adds
//      coord_scale (2 - w_b h_b) [(sx - tx*)^2 + (sy - ty*)^2 + (tw - tw*)^2 + (th - th*)^2]
//      + object_scale (sigmoid(to) - t_obj)^2 + class_scale (logsumexp(c) - c_class)
//    with tx* = cx_b GW - j, tw* = log(w_b GW / anchor_w) (ty*, th* alike), and t_obj the IoU of
//    the predicted box with box b (rescore) or 1;
//  * every other prediction adds noobject_scale sigmoid(to)^2 unless its best IoU with any
//    target box exceeds ignore_thresh.
// t_obj and the ignore test are targets: no gradient flows through them (as Darknet and the
// usual PyTorch ports, which detach them).
//
// Work split: one threadgroup per sample (grid-stride over samples). The sample's boxes are
// decoded once into threadgroup memory (corners + responsible prediction), then each thread
// takes predictions p = tid, tid + 256, ... and loops over the boxes: no atomics, and the
// per-sample sum is a fixed-order tile reduction, so losses are deterministic. The backward
// recomputes the same quantities and writes every channel of x's gradient (zeros included).
//
// NMS (per sample and class, one threadgroup each): candidates are the predictions whose score
// exceeds score_thresh; repeatedly the highest remaining score (lowest index on ties) is kept and
// every remaining candidate whose IoU with it exceeds iou_thresh is dropped (torchvision's
// rule), until none remain or max_det are kept. The remaining scores live in a device scratch
// slice per group, so any number of predictions fits.
// Storage float or half for the network output; every computation is in float.
#include <metal_stdlib>
#include "params.h"
#include "instantiate.h"
#include "tile_reduce.h"
using namespace metal;

inline float sigm(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + precise::exp(-x));
    float e = precise::exp(x);
    return e / (1.0f + e);
}

// IoU of two boxes given as corners (x1, y1, x2, y2); 0 when the union is empty.
inline float box_iou(float4 a, float4 b) {
    float iw = max(min(a.z, b.z) - max(a.x, b.x), 0.0f);
    float ih = max(min(a.w, b.w) - max(a.y, b.y), 0.0f);
    float inter = iw * ih;
    float uni = (a.z - a.x) * (a.w - a.y) + (b.z - b.x) * (b.w - b.y) - inter;
    return uni > 0.0f ? inter / uni : 0.0f;
}

// The decoded quantities of prediction (a, i, j) of one sample.
struct YoloPred {
    float sx, sy, tw, th, conf;
    float4 box;  // corners, image-relative
};

template <typename T>
inline YoloPred yolo_pred(device const T* xs, uint stride, uint a, uint i, uint j,
                          device const float* anchors, constant YoloParams& p) {
    YoloPred r;
    r.sx = sigm(float(xs[0]));
    r.sy = sigm(float(xs[stride]));
    r.tw = float(xs[2u * stride]);
    r.th = float(xs[3u * stride]);
    r.conf = sigm(float(xs[4u * stride]));
    float cx = (float(j) + r.sx) / float(p.GW), cy = (float(i) + r.sy) / float(p.GH);
    float w = anchors[2u * a] * precise::exp(r.tw) / float(p.GW);
    float h = anchors[2u * a + 1u] * precise::exp(r.th) / float(p.GH);
    r.box = float4(cx - 0.5f * w, cy - 0.5f * h, cx + 0.5f * w, cy + 0.5f * h);
    return r;
}

// Threads b < B decode box b of sample n into corners, (class, cx, cy, w, h) and the
// prediction responsible for it (-1 for an empty row). The caller holds a barrier afterwards.
inline void yolo_load_boxes(device const float* tgt, uint n, device const float* anchors,
                            constant YoloParams& p, uint tid, threadgroup float4* corners,
                            threadgroup float4* raw, threadgroup int* owner,
                            threadgroup float* cls) {
    for (uint b = tid; b < p.B; b += TR_TG) {
        device const float* r = tgt + (n * p.B + b) * 5u;
        float c = r[0];
        float4 v = float4(r[1], r[2], r[3], r[4]);
        raw[b] = v;
        cls[b] = c;
        if (c < 0.0f) {
            owner[b] = -1;
            corners[b] = float4(0.0f);
            continue;
        }
        corners[b] = float4(v.x - 0.5f * v.z, v.y - 0.5f * v.w, v.x + 0.5f * v.z, v.y + 0.5f * v.w);
        uint j = min(uint(v.x * float(p.GW)), p.GW - 1u);
        uint i = min(uint(v.y * float(p.GH)), p.GH - 1u);
        // anchor of best shape IoU, boxes sharing a corner (grid units)
        float bw = v.z * float(p.GW), bh = v.w * float(p.GH);
        uint best = 0;
        float bi = -1.0f;
        for (uint a = 0; a < p.A; ++a) {
            float aw = anchors[2u * a], ah = anchors[2u * a + 1u];
            float inter = min(aw, bw) * min(ah, bh);
            float iou = inter / (aw * ah + bw * bh - inter);
            if (iou > bi) {
                bi = iou;
                best = a;
            }
        }
        owner[b] = int((best * p.GH + i) * p.GW + j);
    }
}

// The box responsible for prediction q (the last row assigned to it), or -1.
inline int yolo_owner(int q, uint B, threadgroup int* owner) {
    for (int b = int(B) - 1; b >= 0; --b) {
        if (owner[b] == q) return b;
    }
    return -1;
}

inline float yolo_best_iou(float4 box, uint B, threadgroup float4* corners,
                           threadgroup float* cls) {
    float best = 0.0f;
    for (uint b = 0; b < B; ++b) {
        if (cls[b] >= 0.0f) best = max(best, box_iou(box, corners[b]));
    }
    return best;
}

// out[n]: the sample's loss (per-sample reduction; the host sums or averages).
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void yolo_loss_fwd(device const T* x [[buffer(0)]],
                          device const float* tgt [[buffer(1)]],
                          device const float* anchors [[buffer(2)]],
                          device float* out [[buffer(3)]],
                          constant YoloParams& p [[buffer(4)]],
                          uint tid [[thread_position_in_threadgroup]],
                          uint tg [[threadgroup_position_in_grid]],
                          uint ntg [[threadgroups_per_grid]],
                          uint lane [[thread_index_in_simdgroup]],
                          uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float4 corners[YOLO_MAXB];
    threadgroup float4 raw[YOLO_MAXB];
    threadgroup int owner[YOLO_MAXB];
    threadgroup float cls[YOLO_MAXB];
    threadgroup float scratch[TR_TG];
    const uint HW = p.GH * p.GW, CH = 5u + p.C, P = p.A * HW;
    for (uint n = tg; n < p.N; n += ntg) {
        threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous sample's readers
        yolo_load_boxes(tgt, n, anchors, p, tid, corners, raw, owner, cls);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        float acc = 0.0f;
        for (uint q = tid; q < P; q += TR_TG) {
            uint a = q / HW, cell = q % HW, i = cell / p.GW, j = cell % p.GW;
            device const T* xs = x + (n * p.A + a) * CH * HW + cell;
            YoloPred r = yolo_pred(xs, HW, a, i, j, anchors, p);
            int b = yolo_owner(int(q), p.B, owner);
            if (b < 0) {
                float best = yolo_best_iou(r.box, p.B, corners, cls);
                if (best <= p.ignore_thresh) acc += p.noobject_scale * r.conf * r.conf;
                continue;
            }
            float4 v = raw[b];
            float tx = v.x * float(p.GW) - float(j), ty = v.y * float(p.GH) - float(i);
            float tw = precise::log(v.z * float(p.GW) / anchors[2u * a]);
            float th = precise::log(v.w * float(p.GH) / anchors[2u * a + 1u]);
            float sc = p.coord_scale * (2.0f - v.z * v.w);
            float dx = r.sx - tx, dy = r.sy - ty, dw = r.tw - tw, dh = r.th - th;
            float l = sc * (dx * dx + dy * dy + dw * dw + dh * dh);
            float tobj = p.rescore ? box_iou(r.box, corners[b]) : 1.0f;
            float dc = r.conf - tobj;
            l += p.object_scale * dc * dc;
            // class: logsumexp - logit of the class, max-shifted
            device const T* cs = xs + 5u * HW;
            float m = -INFINITY;
            for (uint c = 0; c < p.C; ++c) m = max(m, float(cs[c * HW]));
            float s = 0.0f;
            for (uint c = 0; c < p.C; ++c) s += precise::exp(float(cs[c * HW]) - m);
            uint k = uint(cls[b]);
            l += p.class_scale * (precise::log(s) + m - float(cs[k * HW]));
            acc += l;
        }
        acc = tile_reduce(acc, TR_SUM, 1u, TR_TG, lane, sg, scratch);
        if (tid == 0) out[n] = acc;
    }
}

// dx = coefficient * d(loss of the sample)/dx, coefficient g[0] * gscale (gmode 0) or
// g[n] * gscale (gmode 1).
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void yolo_loss_bwd(device const float* g [[buffer(0)]],
                          device const T* x [[buffer(1)]],
                          device const float* tgt [[buffer(2)]],
                          device const float* anchors [[buffer(3)]],
                          device T* dx [[buffer(4)]],
                          constant YoloParams& p [[buffer(5)]],
                          uint tid [[thread_position_in_threadgroup]],
                          uint tg [[threadgroup_position_in_grid]],
                          uint ntg [[threadgroups_per_grid]]) {
    threadgroup float4 corners[YOLO_MAXB];
    threadgroup float4 raw[YOLO_MAXB];
    threadgroup int owner[YOLO_MAXB];
    threadgroup float cls[YOLO_MAXB];
    const uint HW = p.GH * p.GW, CH = 5u + p.C, P = p.A * HW;
    for (uint n = tg; n < p.N; n += ntg) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
        yolo_load_boxes(tgt, n, anchors, p, tid, corners, raw, owner, cls);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        const float co = (p.gmode == 0u ? g[0] : g[n]) * p.gscale;
        for (uint q = tid; q < P; q += TR_TG) {
            uint a = q / HW, cell = q % HW, i = cell / p.GW, j = cell % p.GW;
            uint off = (n * p.A + a) * CH * HW + cell;
            device const T* xs = x + off;
            device T* ds = dx + off;
            YoloPred r = yolo_pred(xs, HW, a, i, j, anchors, p);
            int b = yolo_owner(int(q), p.B, owner);
            float gconf = 0.0f;
            float4 gbox = float4(0.0f);
            if (b < 0) {
                float best = yolo_best_iou(r.box, p.B, corners, cls);
                if (best <= p.ignore_thresh) {
                    gconf = 2.0f * p.noobject_scale * r.conf * r.conf * (1.0f - r.conf);
                }
                for (uint c = 0; c < p.C; ++c) ds[(5u + c) * HW] = T(0.0f);
            } else {
                float4 v = raw[b];
                float tx = v.x * float(p.GW) - float(j), ty = v.y * float(p.GH) - float(i);
                float tw = precise::log(v.z * float(p.GW) / anchors[2u * a]);
                float th = precise::log(v.w * float(p.GH) / anchors[2u * a + 1u]);
                float sc = 2.0f * p.coord_scale * (2.0f - v.z * v.w);
                gbox = float4(sc * (r.sx - tx) * r.sx * (1.0f - r.sx),
                              sc * (r.sy - ty) * r.sy * (1.0f - r.sy),
                              sc * (r.tw - tw), sc * (r.th - th));
                float tobj = p.rescore ? box_iou(r.box, corners[b]) : 1.0f;
                gconf = 2.0f * p.object_scale * (r.conf - tobj) * r.conf * (1.0f - r.conf);
                device const T* cs = xs + 5u * HW;
                float m = -INFINITY;
                for (uint c = 0; c < p.C; ++c) m = max(m, float(cs[c * HW]));
                float s = 0.0f;
                for (uint c = 0; c < p.C; ++c) s += precise::exp(float(cs[c * HW]) - m);
                uint k = uint(cls[b]);
                for (uint c = 0; c < p.C; ++c) {
                    float pc = precise::exp(float(cs[c * HW]) - m) / s;
                    ds[(5u + c) * HW] = T(co * p.class_scale * (pc - (c == k ? 1.0f : 0.0f)));
                }
            }
            ds[0] = T(co * gbox.x);
            ds[HW] = T(co * gbox.y);
            ds[2u * HW] = T(co * gbox.z);
            ds[3u * HW] = T(co * gbox.w);
            ds[4u * HW] = T(co * gconf);
        }
    }
}

// One thread per prediction: boxes (N, P, 4) corners, scores (N, P, C) = objectness * softmax.
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void yolo_decode_fwd(device const T* x [[buffer(0)]],
                            device const float* anchors [[buffer(1)]],
                            device float4* boxes [[buffer(2)]],
                            device float* scores [[buffer(3)]],
                            constant YoloParams& p [[buffer(4)]],
                            uint gid [[thread_position_in_grid]],
                            uint ntg [[threadgroups_per_grid]]) {
    const uint HW = p.GH * p.GW, CH = 5u + p.C, P = p.A * HW;
    for (uint t = gid; t < p.N * P; t += ntg * TR_TG) {
        uint n = t / P, q = t % P;
        uint a = q / HW, cell = q % HW, i = cell / p.GW, j = cell % p.GW;
        device const T* xs = x + (n * p.A + a) * CH * HW + cell;
        YoloPred r = yolo_pred(xs, HW, a, i, j, anchors, p);
        boxes[t] = r.box;
        device const T* cs = xs + 5u * HW;
        float m = -INFINITY;
        for (uint c = 0; c < p.C; ++c) m = max(m, float(cs[c * HW]));
        float s = 0.0f;
        for (uint c = 0; c < p.C; ++c) s += precise::exp(float(cs[c * HW]) - m);
        for (uint c = 0; c < p.C; ++c) {
            scores[t * p.C + c] = r.conf * precise::exp(float(cs[c * HW]) - m) / s;
        }
    }
}

// One threadgroup per (sample, class) group: keep[g * max_det + k] the k-th kept prediction
// (descending score), count[g] how many; work: N * C * P floats of scratch.
[[max_total_threads_per_threadgroup(256)]]
kernel void nms_fwd_float(device const float4* boxes [[buffer(0)]],
                          device const float* scores [[buffer(1)]],
                          device float* work [[buffer(2)]],
                          device int* keep [[buffer(3)]],
                          device int* count [[buffer(4)]],
                          constant NmsParams& p [[buffer(5)]],
                          uint tid [[thread_position_in_threadgroup]],
                          uint tg [[threadgroup_position_in_grid]],
                          uint ntg [[threadgroups_per_grid]],
                          uint lane [[thread_index_in_simdgroup]],
                          uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float sv[TR_NSG];
    threadgroup uint si[TR_NSG];
    for (uint grp = tg; grp < p.N * p.C; grp += ntg) {
        uint n = grp / p.C, c = grp % p.C;
        device float* wk = work + grp * p.P;
        device const float4* bx = boxes + n * p.P;
        for (uint q = tid; q < p.P; q += TR_TG) {
            float s = scores[(n * p.P + q) * p.C + c];
            wk[q] = s > p.score_thresh ? s : -INFINITY;  // NaN scores are never candidates
        }
        uint kept = 0;
        // each thread reads and writes only its own q = tid, tid + 256, ... of wk; sv/si are
        // rewritten only after the loop-top barrier, which follows every read of them
        while (kept < p.max_det) {
            threadgroup_barrier(mem_flags::mem_threadgroup);
            float bv = -INFINITY;
            uint bi = UINT_MAX;
            for (uint q = tid; q < p.P; q += TR_TG) {
                float s = wk[q];
                if (s > bv) {  // ascending q: ties keep the lowest index
                    bv = s;
                    bi = q;
                }
            }
            float mv = simd_max(bv);
            uint mi = simd_min(bv == mv ? bi : UINT_MAX);
            if (lane == 0) {
                sv[sg] = mv;
                si[sg] = mi;
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);
            float best = sv[0];
            uint idx = si[0];
            for (uint k = 1; k < TR_NSG; ++k) {
                if (sv[k] > best || (sv[k] == best && si[k] < idx)) {
                    best = sv[k];
                    idx = si[k];
                }
            }
            if (best == -INFINITY) break;  // uniform: every thread read the same sv
            if (tid == 0) keep[grp * p.max_det + kept] = int(idx);
            float4 kb = bx[idx];
            for (uint q = tid; q < p.P; q += TR_TG) {
                if (q == idx || (wk[q] != -INFINITY && box_iou(bx[q], kb) > p.iou_thresh)) {
                    wk[q] = -INFINITY;
                }
            }
            ++kept;
        }
        if (tid == 0) count[grp] = int(kept);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
}

// ---- instantiations -------------------------------------------------------------------------
#define YOLO_ALL(T)                                                                            \
    INSTANTIATE("yolo_loss_fwd_" #T, yolo_loss_fwd, T)                                         \
    INSTANTIATE("yolo_loss_bwd_" #T, yolo_loss_bwd, T)                                         \
    INSTANTIATE("yolo_decode_fwd_" #T, yolo_decode_fwd, T)

YOLO_ALL(float)
YOLO_ALL(half)
