// The kernels of the spinal head with training-mode BatchNorm1d after every hidden Linear
// (spinalkern::cuda_head_bn_forward / _backward).  BatchNorm needs whole-batch statistics of
// z_i before layer i + 1 can start, so the head runs one launch per layer, each followed by a
// small reduction launch; every sum has a fixed order (no atomics), nothing is read on the host.
//
// Forward, for L = 0..n:
//   bn_forward_layer - one CTA per BM-row tile.  Prologue: builds its tile of u_L in shared
//                      memory (x segment, and h_{L-1} = ReLU(gamma (z - mu) r + beta) computed
//                      on the fly from the stored z and the previous statistics, dropout mask
//                      applied; the output layer also writes hidden there) and stages the
//                      bias; meanwhile the first W_L tile is in flight (cp.async, two
//                      stages).  GEMM on the tensor cores for fp16/bf16 (WarpGemm, as the
//                      fused kernels).  Epilogue of a hidden layer: z_L (in x's
//                      dtype) to global memory and, per column, the tile's mean and sum of
//                      squared deviations (two passes over the tile in shared memory).
//   bn_stats         - (hidden layers) one thread per column combines the tiles' (mean, M2) in
//                      tile order (Chan et al.): mu, r = 1/sqrt(var + eps), unbiased var.
// Backward, for L = n..0:
//   bn_backward_layer - one CTA per BM-row tile: dz_L in shared memory (grad_y, or the
//                      BatchNorm backward of layer L from dh_L, the ReLU mask of the saved
//                      hidden, z_L, the statistics and the batch sums of layer L), also stored to
//                      the dz workspace for the weight gradients; du_L = dz_L W_L (W_L tiles
//                      streamed), its dropout mask applied, added to the fp32 grad_x / dh
//                      accumulators of the tile's rows (only this CTA touches them).  Then,
//                      with dh_{L-1} complete, the tile's sums of da and da * xhat of layer
//                      L - 1; layer 0 writes grad_x.
//   bn_grad_sums     - the tiles' sums added in tile order: dgamma_{L-1}, dbeta_{L-1} (grad_bn),
//                      which the next layer launch reads.
// Then the weight gradients with the plain head's wgrad and reduce kernels (the same dz
// workspace layout and padded operands).
#pragma once

#include "head_gemm.cuh"
#include "head_params.h"

namespace spinalkern {
namespace kern {

template <typename T>
struct BnCfg {
  static constexpr int BN = 64;                     // output columns per GEMM pass
  static constexpr int BK = Elem<T>::kBK;           // K per streamed weight tile
  static constexpr int kFwdPitch = BK + kVec<T>;    // forward W tile: [BN rows j][BK cols k]
  static constexpr int kBwdPitch = BN + kVec<T>;    // backward W tile: [BK rows j][BN cols c]
  static constexpr size_t kFwdStage = (size_t)BN * kFwdPitch * sizeof(T);
  static constexpr size_t kBwdStage = (size_t)BK * kBwdPitch * sizeof(T);
};

// Shared memory of one layer launch: the A operand (u_L tile or dz_L tile); forward only: the
// fp32 z tile for the statistics and the layer's bias (fp32, zero past N); then two W stages.
struct BnSmem {
  int pitch;               // row pitch (elements) of the A operand
  size_t zs, bias, ring;   // byte offsets
  size_t total;
};

template <typename T>
SK_HD BnSmem bn_smem(const HeadDims& d, int L, int bm, bool backward) {
  using Cfg = BnCfg<T>;
  using A = acc_t<T>;
  const PaddedLayer lay = padded_layer(d, L);
  BnSmem s;
  s.pitch = smem_pitch<T>(backward ? pad16(lay.N) : lay.K_pad);
  s.zs = align128((size_t)bm * s.pitch * sizeof(T));
  s.bias = s.zs + (backward ? 0 : align128((size_t)bm * (Cfg::BN + 1) * sizeof(A)));
  s.ring = s.bias + (backward ? 0 : align128((size_t)cdiv(lay.N, Cfg::BN) * Cfg::BN * sizeof(A)));
  s.total = s.ring + 2 * (backward ? Cfg::kBwdStage : Cfg::kFwdStage);
  return s;
}

template <typename T>
struct BnParams {
  using A = acc_t<T>;
  const T* x;                    // (B, D), natural layout
  const T* w[kMaxLayers + 1];    // W_0..W_{n-1}, W_out in the padded layout of u_L
  const T* b[kMaxLayers + 1];
  const A* gamma[kMaxLayers];    // BatchNorm weight / bias, or nullptr (affine=False)
  const A* beta[kMaxLayers];
  const uint32_t* masks;         // dropout keep bits (see mask_offset), or nullptr
  T* y;                          // (B, C)
  T* hidden;                     // forward: (B, n*H) output or nullptr; backward: the saved one
  T* z;                          // (B, n*H) pre-BatchNorm z_i
  A* stats;                      // (n, 3, H): mu, r, unbiased var
  A* part;                       // (tiles, 2, H) per-tile partial statistics / sums
  double eps;
  int bm;                        // rows per CTA
  // backward
  const T* grad_y;               // (B, C)
  A* dh;                         // (B, n*H) accumulators, zeroed
  A* gx;                         // (B, D) accumulators, zeroed
  T* grad_x;                     // (B, D)
  T* dz;                         // (B, ldz) workspace, layout of BackwardParams::dz
  int ldz;
  A* gbn;                        // (n, 2, H): dgamma_i, dbeta_i
  HeadDims d;
};

// h of hidden element (row, column col = i * H + j), rounded to T: ReLU(gamma (z - mu) r + beta).
template <typename T>
SK_DEV T bn_hidden(const BnParams<T>& p, int64_t row, int col) {
  using A = acc_t<T>;
  const HeadDims& d = p.d;
  const int i = col / d.H, j = col - i * d.H;
  const A* st = p.stats + (int64_t)i * 3 * d.H;
  A a = (to_acc(p.z[row * d.n * d.H + col]) - st[j]) * st[d.H + j];
  if (p.gamma[0] != nullptr) a = a * p.gamma[i][j] + p.beta[i][j];
  return from_acc<T>(a < A(0) ? A(0) : a);  // ReLU keeps NaN
}

// ---- forward: one layer --------------------------------------------------------------------
template <typename T, int BM>
SK_GLOBAL void SK_LAUNCH_BOUNDS(kThreads)
    bn_forward_layer_kernel(SK_GRID_CONSTANT const BnParams<T> p, int L) {
  using Cfg = BnCfg<T>;
  using A = acc_t<T>;
  constexpr int BN = Cfg::BN, BK = Cfg::BK, SP = Cfg::kFwdPitch, ZP = BN + 1;
  SK_DYNAMIC_SMEM(smem);
  const HeadDims& d = p.d;
  const PaddedLayer lay = padded_layer(d, L);
  const BnSmem sm = bn_smem<T>(d, L, BM, false);
  T* us = reinterpret_cast<T*>(smem);
  A* zs = reinterpret_cast<A*>(smem + sm.zs);
  A* bias = reinterpret_cast<A*>(smem + sm.bias);
  T* ring = reinterpret_cast<T*>(smem + sm.ring);
  const bool out = L == d.n;
  const int row0 = (int)blockIdx.x * BM, rows = min(BM, d.B - row0), nH = d.n * d.H;
  const int N = lay.N, nblk = cdiv(N, BN), nchunks = cdiv(lay.K_pad, BK), ntiles = nblk * nchunks;

  auto issue = [&](int t) {  // W_L tile t (BN outputs x BK inputs) into stage t % 2
    if (t < ntiles) {
      const int nb = t / nchunks, kc = t % nchunks;
      copy_tile_async<BN, BK>(ring + (size_t)(t % 2) * BN * SP, SP,
                              p.w[L] + (int64_t)nb * BN * lay.K_pad + kc * BK, lay.K_pad,
                              N - nb * BN, lay.K_pad - kc * BK);
    }
    cp_async_commit();
  };
  issue(0);
  for (int j = (int)threadIdx.x; j < nblk * BN; j += kThreads)
    bias[j] = j < N ? to_acc(p.b[L][j]) : A(0);
  // u_L tile, dropout applied (the output layer writes hidden on the way)
  for (int idx = (int)threadIdx.x; idx < BM * lay.K_pad; idx += kThreads) {
    const int m = idx / lay.K_pad, c = idx % lay.K_pad, row = row0 + m;
    A v = A(0);
    const UCol u = u_col(d, lay, c);
    if (row < d.B && u.valid) {
      if (u.in_x) {
        v = to_acc(p.x[(int64_t)row * d.D + u.col]);
      } else {
        const T h = bn_hidden(p, row, u.col);
        if (out && p.hidden != nullptr) p.hidden[(int64_t)row * nH + u.col] = h;
        v = to_acc(h);
      }
      if (u.in_x ? lay.drop_x : lay.drop_h) v = dropout(d, p.masks, v, u.mask_col, row, lay.stream);
    }
    us[m * sm.pitch + c] = from_acc<T>(v);
  }

  WarpGemm<T, BM, BN, false, false> g;
  g.zero();
#pragma unroll 1
  for (int t = 0; t < ntiles; ++t) {
    issue(t + 1);
    cp_async_wait<1>();
    __syncthreads();  // tile t (and, at t = 0, the u tile) visible to every thread
    const int nb = t / nchunks, kc = t % nchunks;
    const T* tile = ring + (size_t)(t % 2) * BN * SP;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      const int c = kc * BK + ks * 16;
      if (c < lay.K_pad) g.step(us + c, sm.pitch, tile + ks * 16, SP, rows, N - nb * BN);
    }
    if (kc == nchunks - 1) {
      if (out) {
        g.epilogue([&](int m, int nn, A v) {
          const int j = nb * BN + nn, row = row0 + m;
          if (row < d.B && j < N) p.y[(int64_t)row * d.C + j] = from_acc<T>(v + bias[j]);
        });
      } else {
        g.epilogue([&](int m, int nn, A v) {
          const int j = nb * BN + nn, row = row0 + m;
          const T zt = from_acc<T>(v + bias[j]);
          zs[m * ZP + nn] = to_acc(zt);  // the statistics are those of the stored z
          if (row < d.B && j < N) p.z[(int64_t)row * nH + L * d.H + j] = zt;
        });
        __syncthreads();
        const int j = nb * BN + (int)threadIdx.x;
        if ((int)threadIdx.x < BN && j < N) {  // the tile's mean and M2 of column j
          A s = A(0), m2 = A(0);
          for (int m = 0; m < rows; ++m) s += zs[m * ZP + threadIdx.x];
          const A mean = s / (A)rows;
          for (int m = 0; m < rows; ++m) {
            const A dv = zs[m * ZP + threadIdx.x] - mean;
            m2 += dv * dv;
          }
          A* part = p.part + (int64_t)blockIdx.x * 2 * d.H;
          part[j] = mean;
          part[d.H + j] = m2;
        }
      }
      g.zero();
    }
    __syncthreads();  // stage t % 2 (and zs) free for reuse
  }
  cp_async_wait<0>();
}

// Batch statistics of hidden layer L from the per-tile (mean, M2), combined in tile order.
template <typename T>
SK_GLOBAL void SK_LAUNCH_BOUNDS(kThreads) bn_stats_kernel(SK_GRID_CONSTANT const BnParams<T> p,
                                                          int L) {
  using A = acc_t<T>;
  const HeadDims& d = p.d;
  const int j = (int)(blockIdx.x * kThreads + threadIdx.x);
  if (j >= d.H) return;
  A cnt = A(0), mean = A(0), m2 = A(0);
  for (int t = 0; t * p.bm < d.B; ++t) {
    const A nb = (A)min(p.bm, d.B - t * p.bm);
    const A* part = p.part + (int64_t)t * 2 * d.H;
    const A delta = part[j] - mean, tot = cnt + nb;
    mean += delta * (nb / tot);
    m2 += part[d.H + j] + delta * delta * (cnt * nb / tot);
    cnt = tot;
  }
  A* st = p.stats + (int64_t)L * 3 * d.H;
  st[j] = mean;
  st[d.H + j] = A(1) / sqrt(m2 / cnt + (A)p.eps);
  st[2 * d.H + j] = m2 / (cnt - A(1));
}

// ---- backward: one layer -------------------------------------------------------------------
// da (the gradient of the BatchNorm output, through the ReLU) and xhat of hidden element
// (row, layer i, column j).
template <typename T>
SK_DEV void bn_da_xhat(const BnParams<T>& p, int64_t row, int i, int j, acc_t<T>& da,
                       acc_t<T>& xhat) {
  using A = acc_t<T>;
  const HeadDims& d = p.d;
  const int64_t e = row * d.n * d.H + (int64_t)i * d.H + j;
  const A* st = p.stats + (int64_t)i * 3 * d.H;
  da = to_acc(p.hidden[e]) <= A(0) ? A(0) : p.dh[e];  // ReLU backward as torch
  xhat = (to_acc(p.z[e]) - st[j]) * st[d.H + j];
}

template <typename T, int BM>
SK_GLOBAL void SK_LAUNCH_BOUNDS(kThreads)
    bn_backward_layer_kernel(SK_GRID_CONSTANT const BnParams<T> p, int L) {
  using Cfg = BnCfg<T>;
  using A = acc_t<T>;
  constexpr int BN = Cfg::BN, BK = Cfg::BK, SP = Cfg::kBwdPitch;
  SK_DYNAMIC_SMEM(smem);
  const HeadDims& d = p.d;
  const PaddedLayer lay = padded_layer(d, L);
  const BnSmem sm = bn_smem<T>(d, L, BM, true);
  T* dzs = reinterpret_cast<T*>(smem);
  T* ring = reinterpret_cast<T*>(smem + sm.ring);
  const bool out = L == d.n;
  const int row0 = (int)blockIdx.x * BM, rows = min(BM, d.B - row0), nH = d.n * d.H;
  const int N = lay.N, Np = pad16(N), ncb = cdiv(lay.K_pad, BN), nchunks = cdiv(Np, BK);
  const int ntiles = ncb * nchunks;

  auto issue = [&](int t) {  // W_L tile t (BK outputs x BN inputs) into stage t % 2
    if (t < ntiles) {
      const int cb = t / nchunks, kc = t % nchunks;
      copy_tile_async<BK, BN>(ring + (size_t)(t % 2) * BK * SP, SP,
                              p.w[L] + (int64_t)kc * BK * lay.K_pad + cb * BN, lay.K_pad,
                              N - kc * BK, lay.K_pad - cb * BN);
    }
    cp_async_commit();
  };
  issue(0);
  // dz_L tile (zero in the padding), also to the workspace
  const A inv_b = A(1) / (A)d.B;
  for (int idx = (int)threadIdx.x; idx < BM * Np; idx += kThreads) {
    const int m = idx / Np, j = idx % Np, row = row0 + m;
    A v = A(0);
    if (row < d.B && j < N) {
      if (out) {
        v = to_acc(p.grad_y[(int64_t)row * d.C + j]);
      } else {
        A da, xhat;
        bn_da_xhat(p, row, L, j, da, xhat);
        const A r = p.stats[(int64_t)L * 3 * d.H + d.H + j];
        const A* gs = p.gbn + (int64_t)L * 2 * d.H;
        const A scale = (p.gamma[0] != nullptr ? p.gamma[L][j] : A(1)) * r;
        v = scale * (da - gs[d.H + j] * inv_b - xhat * gs[j] * inv_b);
      }
    }
    const T zt = from_acc<T>(v);
    dzs[m * sm.pitch + j] = zt;
    if (row < d.B) p.dz[(int64_t)row * p.ldz + L * pad16(d.H) + j] = zt;
  }

  WarpGemm<T, BM, BN, false, true> g;
  g.zero();
#pragma unroll 1
  for (int t = 0; t < ntiles; ++t) {
    issue(t + 1);
    cp_async_wait<1>();
    __syncthreads();
    const int cb = t / nchunks, kc = t % nchunks;
    const T* tile = ring + (size_t)(t % 2) * BK * SP;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      const int k = kc * BK + ks * 16;
      if (k < Np) g.step(dzs + k, sm.pitch, tile + ks * 16 * SP, SP, rows, lay.K_pad - cb * BN);
    }
    if (kc == nchunks - 1) {  // du columns cb*BN.. done: dropout, into grad_x / dh
      g.epilogue([&](int m, int nn, A v) {
        const int c = cb * BN + nn, row = row0 + m;
        if (m >= rows || c >= lay.K_pad) return;
        const UCol u = u_col(d, lay, c);
        if (!u.valid) return;
        if (u.in_x ? lay.drop_x : lay.drop_h)
          v = dropout(d, p.masks, v, u.mask_col, row, lay.stream);
        if (u.in_x)
          p.gx[(int64_t)row * d.D + u.col] += v;
        else
          p.dh[(int64_t)row * nH + u.col] += v;
      });
      g.zero();
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  if (L >= 1) {  // dh_{L-1} is complete: the tile's sums of da and da * xhat of layer L - 1
    A* part = p.part + (int64_t)blockIdx.x * 2 * d.H;
    for (int j = (int)threadIdx.x; j < d.H; j += kThreads) {
      A s_da = A(0), s_dax = A(0);
      for (int m = 0; m < rows; ++m) {
        A da, xhat;
        bn_da_xhat(p, row0 + m, L - 1, j, da, xhat);
        s_da += da;
        s_dax += da * xhat;
      }
      part[j] = s_dax;
      part[d.H + j] = s_da;
    }
  } else {
    for (int idx = (int)threadIdx.x; idx < rows * d.D; idx += kThreads)
      p.grad_x[(int64_t)row0 * d.D + idx] = from_acc<T>(p.gx[(int64_t)row0 * d.D + idx]);
  }
}

// dgamma_i = sum of da * xhat, dbeta_i = sum of da over the batch: the tiles' sums in order.
template <typename T>
SK_GLOBAL void SK_LAUNCH_BOUNDS(kThreads)
    bn_grad_sums_kernel(SK_GRID_CONSTANT const BnParams<T> p, int i) {
  using A = acc_t<T>;
  const HeadDims& d = p.d;
  const int j = (int)(blockIdx.x * kThreads + threadIdx.x);
  if (j >= d.H) return;
  A s_dax = A(0), s_da = A(0);
  for (int t = 0; t * p.bm < d.B; ++t) {
    const A* part = p.part + (int64_t)t * 2 * d.H;
    s_dax += part[j];
    s_da += part[d.H + j];
  }
  A* gs = p.gbn + (int64_t)i * 2 * d.H;
  gs[j] = s_dax;
  gs[d.H + j] = s_da;
}

}  // namespace kern
}  // namespace spinalkern
