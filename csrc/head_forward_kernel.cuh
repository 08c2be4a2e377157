// The forward kernel: one launch runs the whole head for a tile of BM rows per CTA.
//
// * Activations on chip: the x row tile is copied to shared memory once (cp.async, prologue)
//   and every h_i is written by its epilogue into shared memory, where the next layers read it;
//   nothing but y goes to global memory at inference (hidden only when it is saved for
//   backward).  When they do not fit, x is read from global memory and h kept in a global
//   scratch (plan.x_res / plan.h_res).
// * One weight stream: the weight tiles of all layers (BN rows x BK columns, in the padded
//   layout of u_L) are streamed through a kStages-deep cp.async ring in the fixed order in
//   which they are consumed, so the prefetch crosses layer boundaries and weight traffic never
//   waits on the dependent chain of layers.  One barrier per tile.
// * Layer inputs are never concatenated: a k-step of 16 columns of u_L reads its A fragment
//   from the x part or from the h slot it falls in.  With dropout (or a non-resident part) the
//   layer's input is first built in shared memory (U) with its mask, once per layer.
// * The spinal output layer (C <= BNY) is accumulated as soon as h_i exists:
//   y += drop(h_i) W_out[:, block i]^T in registers across the whole kernel (plan.interleave),
//   so only two h slots are kept.
#pragma once

#include "head_gemm.cuh"
#include "head_params.h"

namespace spinalkern {
namespace kern {

// The producer side of the weight stream: walks the tiles in consumption order.
//   non-interleaved: for L = 0..n: for each BN block of outputs: K_pad(L) in BK chunks
//   interleaved:     for L = 0..n-1: layer L as above, then W_out[:, block L] in BK chunks
template <typename T, int BM>
struct FwdStream {
  using Cfg = FwdCfg<T, BM>;
  int L, part, nb, kc;   // next tile: layer, part (0: layer L, 1: output block L), block, chunk
  int nblk, nchunks;
  int issued;
  bool done;

  SK_DEV void setup(const HeadDims& d, bool interleave) {
    const int hp = pad16(d.H);
    done = L > d.n || (interleave && L == d.n);
    if (done) return;
    if (part == 0) {
      const PaddedLayer lay = padded_layer(d, L);
      nblk = L == d.n ? cdiv(d.C, Cfg::BN) : cdiv(hp, Cfg::BN);
      nchunks = cdiv(lay.K_pad, Cfg::BK);
    } else {
      nblk = 1;
      nchunks = cdiv(hp, Cfg::BK);
    }
  }
  SK_DEV void begin(const HeadDims& d, bool interleave) {
    L = part = nb = kc = issued = 0;
    setup(d, interleave);
  }
  // Issues the next tile into its ring stage (nothing once every tile is issued).
  SK_DEV void issue(const ForwardParams<T>& p, T* ring, bool interleave) {
    if (done) return;
    const HeadDims& d = p.d;
    T* dst = ring + (size_t)(issued % Cfg::kStages) * Cfg::BN * Cfg::kStagePitch;
    if (part == 0) {
      const int K_pad = padded_layer(d, L).K_pad, N = L == d.n ? d.C : d.H;
      copy_tile_async<Cfg::BN, Cfg::BK>(dst, Cfg::kStagePitch,
                                         p.w[L] + (int64_t)nb * Cfg::BN * K_pad + kc * Cfg::BK,
                                         K_pad, N - nb * Cfg::BN, K_pad - kc * Cfg::BK);
    } else {
      const int hp = pad16(d.H), K_pad = d.n * hp;
      copy_tile_async<Cfg::BN, Cfg::BK>(dst, Cfg::kStagePitch,
                                         p.w[d.n] + L * hp + kc * Cfg::BK, K_pad, d.C,
                                         hp - kc * Cfg::BK);
    }
    ++issued;
    if (++kc < nchunks) return;
    kc = 0;
    if (++nb < nblk) return;
    nb = 0;
    if (interleave && part == 0) {
      part = 1;
    } else {
      part = 0;
      ++L;
    }
    setup(d, interleave);
  }
};

template <typename T, int BM>
SK_GLOBAL void SK_LAUNCH_BOUNDS(kThreads)
    head_forward_kernel(SK_GRID_CONSTANT const ForwardParams<T> p) {
  using Cfg = FwdCfg<T, BM>;
  using A = acc_t<T>;
  constexpr int S = Cfg::kStages, BK = Cfg::BK, BN = Cfg::BN, SP = Cfg::kStagePitch;
  constexpr size_t kStageElems = (size_t)BN * SP;
  SK_DYNAMIC_SMEM(smem);
  const HeadDims& d = p.d;
  const ForwardPlan& pl = p.plan;
  const int row0 = (int)blockIdx.x * BM, rows = min(BM, d.B - row0);
  const int hp = pad16(d.H), hpw = h_pad_width(d), nH = d.n * d.H;
  T* act = pl.smem.ptr<T>(smem, kSmAct);
  T* ubuf = pl.smem.ptr<T>(smem, kSmU);
  A* bias = pl.smem.ptr<A>(smem, kSmBias);
  T* ring = pl.smem.ptr<T>(smem, kSmRing);

  // Prologue: x row tile (async), biases (layer L at L * hp, zero in the padding), stream.
  if (pl.x_res) {
    copy_rows_async(act, pl.act_pitch, p.x + (int64_t)row0 * d.D, d.D, BM, rows, d.D);
  }
  cp_async_commit();
  FwdStream<T, BM> st;
  st.begin(d, pl.interleave);
#pragma unroll 1
  for (int s = 0; s < S - 1; ++s) {
    st.issue(p, ring, pl.interleave);
    cp_async_commit();
  }
  for (int L = 0; L <= d.n; ++L) {
    const int N = L == d.n ? d.C : d.H, width = L == d.n ? pad16(d.C) : hp;
    for (int j = (int)threadIdx.x; j < width; j += kThreads)
      bias[L * hp + j] = j < N ? to_acc(p.b[L][j]) : A(0);
  }

  // Writes U[m][c - k0] = u_L[row0 + m][c] (dropout applied) for the padded columns
  // [k0, k1) of u_L, from the resident x / h or from global memory.
  auto build_u = [&](int L, int k0, int k1) {
    const PaddedLayer lay = padded_layer(d, L);
    const int w = k1 - k0;
    for (int idx = (int)threadIdx.x; idx < BM * w; idx += kThreads) {
      const int m = idx / w, c = k0 + idx % w, row = row0 + m;
      A v = A(0);
      const UCol u = u_col(d, lay, c);
      if (row < d.B && u.valid) {
        if (u.in_x)
          v = to_acc(pl.x_res ? act[m * pl.act_pitch + lay.xoff_pad + c]
                              : p.x[(int64_t)row * d.D + u.col]);
        else
          v = to_acc(pl.h_res ? act[m * pl.act_pitch + pl.act_hcol + (u.blk % pl.hslots) * hp + u.j]
                              : p.hscratch[(int64_t)row * hpw + u.blk * hp + u.j]);
        if (u.in_x ? lay.drop_x : lay.drop_h) v = dropout(d, p.masks, v, u.mask_col, row, lay.stream);
      }
      ubuf[m * pl.u_pitch + (c - k0)] = from_acc<T>(v);
    }
  };

  int consumed = 0;
  // Waits for the next tile, frees the oldest stage for the producer, returns the tile.
  auto next_tile = [&]() -> const T* {
    cp_async_wait<S - 2>();
    __syncthreads();
    st.issue(p, ring, pl.interleave);
    cp_async_commit();
    return ring + (size_t)(consumed++ % S) * kStageElems;
  };

  if (pl.use_u && pl.x_res) {  // the first U is built from the x tile: wait for it
    cp_async_wait<S - 1>();
    __syncthreads();
  }
  WarpGemm<T, BM, Cfg::BNY, false, false> gy;  // the interleaved output's accumulators
  gy.zero();
  const int nlayers = pl.interleave ? d.n : d.n + 1;
  for (int L = 0; L < nlayers; ++L) {
    const PaddedLayer lay = padded_layer(d, L);
    const bool out = L == d.n;
    // A(m, c) = abase[m * apitch + c + (c < split ? xdelta : hdelta)]
    const T* abase;
    int apitch, split, xdelta, hdelta;
    if (pl.use_u) {
      __syncthreads();  // the previous layer is done with U, and its h is complete
      build_u(L, 0, lay.K_pad);
      __syncthreads();
      abase = ubuf;
      apitch = pl.u_pitch;
      split = lay.K_pad;
      xdelta = hdelta = 0;
    } else {
      abase = act;
      apitch = pl.act_pitch;
      split = lay.xw_pad;
      xdelta = lay.xoff_pad;
      hdelta = pl.act_hcol + (lay.hblk0 % pl.hslots) * hp - lay.xw_pad;
    }
    const int nblk = out ? cdiv(d.C, BN) : cdiv(hp, BN), nchunks = cdiv(lay.K_pad, BK);
    for (int nb = 0; nb < nblk; ++nb) {
      WarpGemm<T, BM, BN, false, false> g;
      g.zero();
      const int nvalid = (out ? d.C : hp) - nb * BN;
#pragma unroll 1
      for (int kc = 0; kc < nchunks; ++kc) {
        const T* tile = next_tile();
#pragma unroll
        for (int ks = 0; ks < BK / 16; ++ks) {
          const int c = kc * BK + ks * 16;
          if (c < lay.K_pad)
            g.step(abase + c + (c < split ? xdelta : hdelta), apitch, tile + ks * 16, SP, rows,
                   nvalid);
        }
      }
      if (!out) {  // bias + ReLU -> h_L (resident slot or scratch; zero in the padding)
        T* hdst = pl.h_res ? act + pl.act_hcol + (L % pl.hslots) * hp : nullptr;
        g.epilogue([&](int m, int nn, A v) {
          const int j = nb * BN + nn, row = row0 + m;
          if (j >= hp) return;
          v += bias[L * hp + j];
          const T h = from_acc<T>(j < d.H ? (v < A(0) ? A(0) : v) : A(0));  // ReLU keeps NaN
          if (hdst != nullptr)
            hdst[m * pl.act_pitch + j] = h;
          else if (row < d.B)
            p.hscratch[(int64_t)row * hpw + L * hp + j] = h;
          if (p.hidden != nullptr && row < d.B && j < d.H)
            p.hidden[(int64_t)row * nH + L * d.H + j] = h;
        });
      } else {
        g.epilogue([&](int m, int nn, A v) {
          const int j = nb * BN + nn, row = row0 + m;
          if (row < d.B && j < d.C) p.y[(int64_t)row * d.C + j] = from_acc<T>(v + bias[L * hp + j]);
        });
      }
    }
    if (pl.interleave) {  // y += drop(h_L) W_out[:, block L]^T
      __syncthreads();    // h_L is complete (and U free)
      int ydelta;
      if (pl.use_u) {
        build_u(d.n, L * hp, (L + 1) * hp);
        __syncthreads();
        abase = ubuf;
        apitch = pl.u_pitch;
        ydelta = -L * hp;
      } else {
        abase = act;
        apitch = pl.act_pitch;
        ydelta = pl.act_hcol + (L % pl.hslots) * hp - L * hp;
      }
      const int ychunks = cdiv(hp, BK);
#pragma unroll 1
      for (int kc = 0; kc < ychunks; ++kc) {
        const T* tile = next_tile();
#pragma unroll
        for (int ks = 0; ks < BK / 16; ++ks) {
          const int c = L * hp + kc * BK + ks * 16;
          if (c < (L + 1) * hp) gy.step(abase + c + ydelta, apitch, tile + ks * 16, SP, rows, d.C);
        }
      }
    }
  }
  if (pl.interleave) {
    gy.epilogue([&](int m, int j, A v) {
      const int row = row0 + m;
      if (row < d.B && j < d.C) p.y[(int64_t)row * d.C + j] = from_acc<T>(v + bias[d.n * hp + j]);
    });
  }
  cp_async_wait<0>();
}

}  // namespace kern
}  // namespace spinalkern
