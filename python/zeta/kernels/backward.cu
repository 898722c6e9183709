// Backward of the Cauchy top-k attention, one warp per query.
//
// With s_j = 1/(d2_j + g2), z = sum s (plus the mean item), a_j = s_j / z, o = sum a_j v_j and
// G = dL/do: g_j = G . v_j, dL/ds_j = (g_j - G . o) / z with G . o = sum a_j g_j, and since
// ds/d(d2) = ds/d(g2) = -s^2, t_j = dL/d(d2_j) = -s_j^2 dL/ds_j = -(g_j - G . o) a_j s_j. Then
//   dq += 2 (q - k_j) t_j,   dk_j -= 2 (q - k_j) t_j,   dv_j += a_j G,   dg2 += t_j.
// The selected positions come from the forward (constants), so nothing is searched again.
// dk and dv are scattered with float atomics (a key is picked by many queries); dq, the
// per-query dg2 and the mean item's gradients (dkbar, dvbar per query head) are plain writes.
#include "common.cuh"

namespace zeta {

template <class V>
__global__ void backward_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                const V* __restrict__ v, const double* __restrict__ gamma,
                                const int* __restrict__ idx, const V* __restrict__ dout,
                                const float* __restrict__ kbar, const float* __restrict__ vbar,
                                int mean_token, long long n, long long s, int b, int h, int hkv,
                                int dk, int dv, int topk, float* __restrict__ dq,
                                float* __restrict__ dkk, float* __restrict__ dvv,
                                float* __restrict__ dg2, float* __restrict__ dkbar,
                                float* __restrict__ dvbar) {
    ZETA_DYN_SMEM(float, smem);
    const int warps = blockDim.x / 32;
    const int wib = threadIdx.x / 32;
    const long long w = static_cast<long long>(blockIdx.x) * warps + wib;
    const long long total = static_cast<long long>(b) * h * n;
    if (w >= total) return;
    const unsigned lane = lane_id();
    // Per warp: scores s_j, then g_j = G . v_j, then positions (topk each).
    float* sc = smem + static_cast<long long>(wib) * 3 * topk;
    float* gd = sc + topk;
    int* ps = reinterpret_cast<int*>(gd + topk);

    const long long i = w % n, bh = w / n;
    const int hh = static_cast<int>(bh % h);
    const long long g = (bh / h) * hkv + hh / (h / hkv);
    const float* kg = k + g * s * dk;
    const V* vg = v + g * s * dv;
    const float g2 = static_cast<float>(gamma[hh] * gamma[hh]);
    float qv[ZETA_MAX_DK];
    for (int j = 0; j < ZETA_MAX_DK; ++j) qv[j] = j < dk ? q[w * dk + j] : 0.0f;

    for (int j = lane; j < topk; j += 32) {
        int pos = idx[w * topk + j];
        ps[j] = pos;
        sc[j] = pos >= 0 ? __fdiv_rn(1.0f, __fadd_rn(sq_dist(qv, kg + static_cast<long long>(pos) * dk, dk), g2)) : 0.0f;
    }
    __syncwarp();
    float z = 0.0f;
    int count = 0;
    for (int j = 0; j < topk && ps[j] >= 0; ++j, ++count) z = __fadd_rn(z, sc[j]);
    const float* kb = kbar + (g * n + i) * dk;
    const float* vb = vbar + (g * n + i) * dv;
    float sm = 0.0f;
    if (mean_token) {
        sm = __fdiv_rn(1.0f, __fadd_rn(sq_dist(qv, kb, dk), g2));
        z = __fadd_rn(z, sm);
    }
    const float inv = 1.0f / z;
    const V* G = dout + w * dv;

    // g_j = G . v_j (lanes over columns, one warp reduction per slot); G . o = sum a_j g_j.
    float go = 0.0f;
    for (int j = 0; j < count; ++j) {
        const V* vr = vg + static_cast<long long>(ps[j]) * dv;
        float part = 0.0f;
        for (int col = lane; col < dv; col += 32) part += to_float(G[col]) * to_float(vr[col]);
        float gj = warp_sum(part);
        if (lane == 0) gd[j] = gj;
        go += sc[j] * inv * gj;
    }
    float gm = 0.0f;
    if (mean_token) {
        float part = 0.0f;
        for (int col = lane; col < dv; col += 32) part += to_float(G[col]) * vb[col];
        gm = warp_sum(part);
        go += sm * inv * gm;
    }
    __syncwarp();

    // dv_j += a_j G (lanes over columns).
    for (int j = 0; j < count; ++j) {
        const float aj = sc[j] * inv;
        float* dst = dvv + (g * s + ps[j]) * dv;
        for (int col = lane; col < dv; col += 32) atomicAdd(dst + col, aj * to_float(G[col]));
    }
    // Slots over lanes: dk_j, and this lane's share of dq and dg2.
    float dqp[ZETA_MAX_DK];
    for (int d = 0; d < ZETA_MAX_DK; ++d) dqp[d] = 0.0f;
    float dg = 0.0f;
    for (int j = lane; j < count; j += 32) {
        // -s_j^2 (g_j - G.o) / z as -(g_j - G.o) a_j s_j (a_j <= 1): 1/z alone overflows
        // where every score is tiny (keys far off, a huge gamma), as in the Rust core.
        const float t = -(gd[j] - go) * (sc[j] * inv) * sc[j];
        dg += t;
        const float* kr = kg + static_cast<long long>(ps[j]) * dk;
        for (int d = 0; d < dk; ++d) {
            const float c = 2.0f * (qv[d] - kr[d]) * t;
            dqp[d] += c;
            atomicAdd(dkk + (g * s + ps[j]) * dk + d, -c);
        }
    }
    if (mean_token && lane == 0) {
        const float t = -(gm - go) * (sm * inv) * sm;
        dg += t;
        for (int d = 0; d < dk; ++d) {
            const float c = 2.0f * (qv[d] - kb[d]) * t;
            dqp[d] += c;
            dkbar[w * dk + d] = -c;
        }
    }
    if (mean_token) {
        const float am = sm * inv;
        for (int col = lane; col < dv; col += 32) dvbar[w * dv + col] = am * to_float(G[col]);
    }
    dg = warp_sum(dg);
    for (int d = 0; d < dk; ++d) {
        float x = warp_sum(dqp[d]);
        if (lane == 0) dq[w * dk + d] = x;
    }
    if (lane == 0) dg2[w] = dg;
}

}  // namespace zeta
