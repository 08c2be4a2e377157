// spinalkern CUDA extension: op schemas and the C++ CPU implementation.
//
// The ops (schemas: op_schemas.h; the same as spinalkern/ops.py):
//   spinalkern::cuda_head_forward(x, weights, biases, seed, kind, num_splits, dropout,
//                                 save_hidden) -> (y, hidden)
//   spinalkern::cuda_head_backward(grad_y, x, weights, hidden, seed, kind, num_splits,
//                                  dropout) -> (grad_x, grad_params)
//   spinalkern::cuda_head_bn_forward / cuda_head_bn_backward: the spinal head with training-mode
//                                  BatchNorm1d after every hidden Linear (ops.define_bn_ops)
//   spinalkern::cuda_keep_mask(seed, stream, rows, cols, p) -> bool mask (testing aid)
// The CUDA implementations live in spinal_head_{forward,backward}.cu.  The CPU
// implementation below is a second, independent implementation written row by row (it
// materialises every layer input u_L), used on CPU tensors and as a cross-check.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "head_layout.h"
#include "op_checks.h"
#include "op_schemas.h"

namespace spinalkern {
namespace {

template <typename T>
using cpu_acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
std::vector<const T*> data_ptrs(const std::vector<at::Tensor>& ts) {
  std::vector<const T*> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.data_ptr<T>());
  return out;
}

uint64_t seed_value(const HeadDims& d, const std::optional<at::Tensor>& seed) {
  // a CPU tensor (checked): read directly, no dispatcher round trip
  return d.dropout ? (uint64_t)seed->const_data_ptr<int64_t>()[0] : 0;
}

// ---- accurate sums ---------------------------------------------------------------------------
// Sequential fp32 summation loses accuracy linearly in the number of terms (a dot product of
// 2^25 equal terms stalls at half its value).  Dot products here are pairwise: blocks of at
// most kPairBlock terms, each summed in 8 interleaved partial sums, combined in a binary tree
// (error O(log K) instead of O(K), as numpy's pairwise sum); long sums of vectors use the same
// tree over blocks of kPairBlock terms (VectorSum).  Both are in a fixed order: deterministic.
constexpr int64_t kPairBlock = 128;

// One block (K <= kPairBlock): 8 interleaved partial sums, combined in a tree.
template <typename A, typename T>
inline A dot_block(const A* __restrict u, const T* __restrict w, int64_t K) {
  A s[8] = {A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0)};
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    for (int i = 0; i < 8; ++i) s[i] += u[k + i] * (A)w[k + i];
  A r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; k < K; ++k) r += u[k] * (A)w[k];
  return r;
}

template <typename A, typename T>
A dot_pairwise_tree(const A* u, const T* w, int64_t K) {
  if (K <= kPairBlock) return dot_block(u, w, K);
  const int64_t half = (K / 2 + 7) / 8 * 8;
  return dot_pairwise_tree(u, w, half) + dot_pairwise_tree(u + half, w + half, K - half);
}

// The dot product of u and w, pairwise (a single block inline: most layers are that short).
template <typename A, typename T>
inline A dot_pairwise(const A* u, const T* w, int64_t K) {
  return K <= kPairBlock ? dot_block(u, w, K) : dot_pairwise_tree(u, w, K);
}

// Sum of a stream of vectors of length len: add terms into block(), then call next(terms).
// Every kPairBlock terms the block joins a binary carry chain of partial sums (level l holds
// the sum of 2^l blocks), so the sum is pairwise over blocks.  (Terms come in groups of at
// most kGroup, a divisor of kPairBlock, so blocks always hold exactly kPairBlock terms.)
template <typename A>
class VectorSum {
 public:
  void reset(int64_t len) {
    len_ = len;
    terms_ = 0;
    block_.assign(len, A(0));
    for (auto& l : levels_) l.clear();
  }
  A* block() { return block_.data(); }
  void next(int64_t terms) {
    if ((terms_ += terms) < kPairBlock) return;
    terms_ = 0;
    for (size_t l = 0;; ++l) {
      if (l == levels_.size()) levels_.emplace_back();
      if (levels_[l].empty()) {
        levels_[l].swap(block_);
        break;
      }
      for (int64_t i = 0; i < len_; ++i) block_[i] += levels_[l][i];
      levels_[l].clear();
    }
    block_.assign(len_, A(0));
  }
  // The total, from the partial block up the levels (a fixed order).
  A* total() {
    for (auto& l : levels_)
      if (!l.empty())
        for (int64_t i = 0; i < len_; ++i) block_[i] += l[i];
    return block_.data();
  }

 private:
  int64_t len_ = 0, terms_ = 0;
  std::vector<A> block_;
  std::vector<std::vector<A>> levels_;
};

// Rows per parallel_for task: enough work (multiply-adds) per task that threads pay off, so
// a tiny batch runs inline on the calling thread.
int64_t grain_for(int64_t work_per_item) {
  constexpr int64_t kWorkPerTask = 1 << 16;
  return std::max<int64_t>(1, kWorkPerTask / std::max<int64_t>(1, work_per_item));
}

// The row loops of the plain head's ops are compiled twice, for AVX2 and for baseline x86-64,
// and the loader picks one for the machine (GCC's function multiversioning).  AVX2 without
// FMA: both versions round every operation alike, so their results are the same bits.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SK_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SK_CPU_CLONES
#endif

// v[c] *= dropout(column c of u_L) for the columns of u_L that dropout applies to.
template <typename A>
void apply_dropout(const HeadDims& d, const LayerInfo& li, int row, uint64_t seed, A* v) {
  const A scale = (A)d.scale;
  const int c0 = li.drop_x ? 0 : li.xw, c1 = li.drop_h ? li.K : li.xw;
  for (int c = c0; c < c1; ++c)
    v[c] = keep_element(seed, c, row, li.stream, d.threshold) ? v[c] * scale : A(0);
}

// u_L of one row, dropout applied, in the accumulation type.
template <typename T, typename A>
void build_input(const HeadDims& d, const LayerInfo& li, int row, uint64_t seed,
                 const T* __restrict xrow, const A* __restrict hrow, A* __restrict u) {
  const int xw = li.xw, hw = li.hw;  // (bounds and bases in locals: the copies vectorise)
  const T* __restrict xs = xrow + li.xoff;
  const A* __restrict hs = hrow + li.hoff;
  A* __restrict uh = u + xw;
  for (int c = 0; c < xw; ++c) u[c] = (A)xs[c];
  for (int c = 0; c < hw; ++c) uh[c] = hs[c];
  if (li.drop_x || li.drop_h) apply_dropout(d, li, row, seed, u);
}

// acc[0:len] += sum over i < m of g[i] * v_i[0:len], v_i = v + i * stride, m <= kGroup: a
// group of terms per pass over acc (fewer loads and stores of acc than one term at a time).
constexpr int kGroup = 4;
static_assert(kPairBlock % kGroup == 0, "blocks must hold whole groups");

template <typename A, typename T>
inline void add_terms(A* __restrict acc, const A* g, const T* v, int64_t stride, int m,
                      int64_t len) {
  if (m == kGroup) {
    const T* __restrict v0 = v;
    const T* __restrict v1 = v + stride;
    const T* __restrict v2 = v + 2 * stride;
    const T* __restrict v3 = v + 3 * stride;
    const A g0 = g[0], g1 = g[1], g2 = g[2], g3 = g[3];
    for (int64_t c = 0; c < len; ++c)
      acc[c] += (g0 * (A)v0[c] + g1 * (A)v1[c]) + (g2 * (A)v2[c] + g3 * (A)v3[c]);
    return;
  }
  for (int i = 0; i < m; ++i) {
    const T* __restrict vi = v + i * stride;
    const A gi = g[i];
    for (int64_t c = 0; c < len; ++c) acc[c] += gi * (A)vi[c];
  }
}

// Rows r0..r1 of the forward.
template <typename T>
SK_CPU_CLONES void forward_rows(const HeadDims& d, const std::vector<LayerInfo>& lis, int maxK,
                                const T* x, const std::vector<const T*>& W,
                                const std::vector<const T*>& bias, uint64_t seed, T* y,
                                T* hidden, int64_t r0, int64_t r1) {
  using A = cpu_acc_t<T>;
  const int n = d.n, nH = d.n * d.H;
  std::vector<A> h(nH), u(maxK);
  for (int64_t row = r0; row < r1; ++row) {
    const T* xrow = x + row * d.D;
    for (int L = 0; L <= n; ++L) {
      const LayerInfo& li = lis[L];
      build_input<T, A>(d, li, (int)row, seed, xrow, h.data(), u.data());
      for (int j = 0; j < li.N; ++j) {
        // z_j = u . W_L[j, :] + b_j  (W_L row-major: row j is contiguous)
        const A z = dot_pairwise(u.data(), W[L] + (int64_t)j * li.K, li.K) + (A)bias[L][j];
        if (L < n) {
          const A r = z < A(0) ? A(0) : z;  // keeps NaN, like torch.relu
          const T rt = (T)r;                // h is stored in x's dtype
          h[L * d.H + j] = (A)rt;
          if (hidden) hidden[row * nH + L * d.H + j] = rt;
        } else {
          y[row * d.C + j] = (T)z;
        }
      }
    }
  }
}

template <typename T>
void forward_cpu(const HeadDims& d, const T* x, const std::vector<const T*>& W,
                 const std::vector<const T*>& bias, uint64_t seed, T* y, T* hidden) {
  std::vector<LayerInfo> lis(d.n + 1);
  int maxK = 0;
  int64_t work = 0;
  for (int L = 0; L <= d.n; ++L) {
    lis[L] = layer_info(d, L);
    maxK = std::max(maxK, lis[L].K);
    work += (int64_t)lis[L].K * lis[L].N;
  }
  at::parallel_for(0, d.B, grain_for(work), [&](int64_t r0, int64_t r1) {
    forward_rows(d, lis, maxK, x, W, bias, seed, y, hidden, r0, r1);
  });
}

// du = dz_L W_L of one row (a sum over the layer's outputs j, rows of W_L, kGroup at a time),
// times the layer's dropout mask, added to the row's x gradient gxa and hidden gradient dh.
template <typename T, typename A>
void input_grad(const HeadDims& d, const LayerInfo& li, int row, uint64_t seed, const A* dz,
                const T* W, VectorSum<A>& du, A* gxa, A* dh) {
  du.reset(li.K);
  for (int j = 0; j < li.N; j += kGroup) {
    const int m = std::min(kGroup, li.N - j);
    add_terms(du.block(), dz + j, W + (size_t)j * li.K, li.K, m, li.K);
    du.next(m);
  }
  A* dus = du.total();
  if (li.drop_x || li.drop_h) apply_dropout(d, li, row, seed, dus);
  const int xw = li.xw, hw = li.hw;  // (bounds and bases in locals: the sums vectorise)
  const A* __restrict dx = dus;
  const A* __restrict dhs = dus + xw;
  A* __restrict gx = gxa + li.xoff;
  A* __restrict gh = dh + li.hoff;
  for (int c = 0; c < xw; ++c) gx[c] += dx[c];
  for (int c = 0; c < hw; ++c) gh[c] += dhs[c];
}

template <typename T, typename A>
void weight_grads(const HeadDims& d, const std::vector<LayerInfo>& lis,
                  const std::vector<int64_t>& uoff, const std::vector<int64_t>& zoff,
                  const std::vector<A>& U, const std::vector<A>& DZ, T* gparams);

// Every layer's LayerInfo and the offsets of u_L / dz_L in a row of the U / DZ buffers.
inline void layer_offsets(const HeadDims& d, std::vector<LayerInfo>& lis,
                          std::vector<int64_t>& uoff, std::vector<int64_t>& zoff) {
  uoff.assign(d.n + 2, 0);
  zoff.assign(d.n + 2, 0);
  for (int L = 0; L <= d.n; ++L) {
    lis[L] = layer_info(d, L);
    uoff[L + 1] = uoff[L] + lis[L].K;
    zoff[L + 1] = zoff[L] + lis[L].N;
  }
}

// Rows r0..r1 of the backward's input gradients; fills their rows of U and DZ.
template <typename T, typename A>
SK_CPU_CLONES void backward_rows(const HeadDims& d, const std::vector<LayerInfo>& lis,
                                 const std::vector<int64_t>& uoff,
                                 const std::vector<int64_t>& zoff, const T* gy, const T* x,
                                 const std::vector<const T*>& W, const T* hidden, uint64_t seed,
                                 T* gx, A* U, A* DZ, int64_t r0, int64_t r1) {
  const int n = d.n, nH = d.n * d.H;
  std::vector<A> h(nH), dh(nH), gxa(d.D);
  VectorSum<A> du;
  for (int64_t row = r0; row < r1; ++row) {
    const T* xrow = x + row * d.D;
    for (int j = 0; j < nH; ++j) h[j] = (A)hidden[row * nH + j];
    std::fill(dh.begin(), dh.end(), A(0));
    std::fill(gxa.begin(), gxa.end(), A(0));
    A* urow = U + (size_t)row * uoff[n + 1];
    A* zrow = DZ + (size_t)row * zoff[n + 1];
    for (int L = 0; L <= n; ++L)
      build_input<T, A>(d, lis[L], (int)row, seed, xrow, h.data(), urow + uoff[L]);
    for (int L = n; L >= 0; --L) {
      const LayerInfo& li = lis[L];
      A* dz = zrow + zoff[L];
      if (L == n) {
        for (int j = 0; j < d.C; ++j) dz[j] = (A)gy[row * d.C + j];
      } else {
        // ReLU backward as torch: zero where the output is <= 0 (NaN passes the gradient)
        for (int j = 0; j < d.H; ++j) dz[j] = h[L * d.H + j] <= A(0) ? A(0) : dh[L * d.H + j];
      }
      input_grad(d, li, (int)row, seed, dz, W[L], du, gxa.data(), dh.data());
    }
    for (int c = 0; c < d.D; ++c) gx[row * d.D + c] = (T)gxa[c];
  }
}

template <typename T>
void backward_cpu(const HeadDims& d, const T* gy, const T* x, const std::vector<const T*>& W,
                  const T* hidden, uint64_t seed, T* gx, T* gparams) {
  using A = cpu_acc_t<T>;
  const int n = d.n;
  std::vector<LayerInfo> lis(n + 1);
  std::vector<int64_t> uoff, zoff;
  layer_offsets(d, lis, uoff, zoff);
  const int64_t work = zoff[n + 1] == 0 ? 1 : uoff[n + 1] * zoff[n + 1] / (n + 1);
  // Per row: every layer's dropped input u_L and output gradient dz_L (needed for dW).
  std::vector<A> U((size_t)d.B * uoff[n + 1]), DZ((size_t)d.B * zoff[n + 1]);
  at::parallel_for(0, d.B, grain_for(2 * work), [&](int64_t r0, int64_t r1) {
    backward_rows(d, lis, uoff, zoff, gy, x, W, hidden, seed, gx, U.data(), DZ.data(), r0, r1);
  });
  weight_grads(d, lis, uoff, zoff, U, DZ, gparams);
}

// Tasks t0..t1 (each a (layer, output) pair) of weight_grads below.
template <typename T, typename A>
SK_CPU_CLONES void weight_grad_tasks(const HeadDims& d, const std::vector<LayerInfo>& lis,
                                     const std::vector<int64_t>& uoff,
                                     const std::vector<int64_t>& zoff, const A* U, const A* DZ,
                                     const std::pair<int, int>* tasks, T* gparams, int64_t t0,
                                     int64_t t1) {
  const int n = d.n;
  VectorSum<A> acc;
  for (int64_t t = t0; t < t1; ++t) {
    const int L = tasks[t].first, j = tasks[t].second;
    const LayerInfo& li = lis[L];
    acc.reset(li.K + 1);
    for (int64_t row = 0; row < d.B; row += kGroup) {  // kGroup rows at a time
      const int m = (int)std::min<int64_t>(kGroup, d.B - row);
      A g[kGroup];
      for (int i = 0; i < m; ++i) g[i] = DZ[(size_t)(row + i) * zoff[n + 1] + zoff[L] + j];
      A* a = acc.block();
      add_terms(a, g, U + (size_t)row * uoff[n + 1] + uoff[L], uoff[n + 1], m, li.K);
      for (int i = 0; i < m; ++i) a[li.K] += g[i];
      acc.next(m);
    }
    const A* __restrict sum = acc.total();
    const int K = li.K;
    const int64_t woff = param_offset(d, L);
    T* __restrict dw = gparams + woff + (int64_t)j * K;  // row j of dW_L
    for (int c = 0; c < K; ++c) dw[c] = (T)sum[c];
    gparams[woff + (int64_t)li.N * K + j] = (T)sum[K];
  }
}

// dW_L[j, :] = sum over rows of dz_L[row, j] * u_L[row, :] and db_L[j] = sum of dz_L[row, j]
// (element K of the same sum); one task per (L, j), rows summed in a fixed order, so the
// result does not depend on the number of threads.  U / DZ: every row's dropped layer inputs
// u_L (at uoff[L]) and output gradients dz_L (at zoff[L]).
template <typename T, typename A>
void weight_grads(const HeadDims& d, const std::vector<LayerInfo>& lis,
                  const std::vector<int64_t>& uoff, const std::vector<int64_t>& zoff,
                  const std::vector<A>& U, const std::vector<A>& DZ, T* gparams) {
  const int n = d.n;
  int maxK = 0;
  for (const auto& li : lis) maxK = std::max(maxK, li.K);
  std::vector<std::pair<int, int>> tasks;
  tasks.reserve(zoff[n + 1]);
  for (int L = 0; L <= n; ++L)
    for (int j = 0; j < lis[L].N; ++j) tasks.emplace_back(L, j);
  at::parallel_for(0, (int64_t)tasks.size(), grain_for((int64_t)d.B * maxK),
                   [&](int64_t t0, int64_t t1) {
    weight_grad_tasks(d, lis, uoff, zoff, U.data(), DZ.data(), tasks.data(), gparams, t0, t1);
  });
}

// ---- training-mode BatchNorm (the spinal head) ------------------------------------------------
// Layer by layer over the whole batch: z_i for every row, then its batch statistics (sums in
// float64, rows in a fixed order), then h_i, which the next layer reads.  z and h are rounded
// to x's dtype as the kernels store them; the statistics are those of the rounded z.
template <typename T>
void bn_forward_cpu(const HeadDims& d, const T* x, const std::vector<const T*>& W,
                    const std::vector<const T*>& bias, const std::vector<const cpu_acc_t<T>*>& gamma,
                    const std::vector<const cpu_acc_t<T>*>& beta, double eps, uint64_t seed, T* y,
                    T* hidden, T* zout, cpu_acc_t<T>* stats) {
  using A = cpu_acc_t<T>;
  const int n = d.n, H = d.H, nH = d.n * d.H;
  const int64_t B = d.B;
  std::vector<LayerInfo> lis(n + 1);
  int maxK = 0;
  for (int L = 0; L <= n; ++L) {
    lis[L] = layer_info(d, L);
    maxK = std::max(maxK, lis[L].K);
  }
  std::vector<T> Z((size_t)B * nH);   // z_i, rounded
  std::vector<A> Hs((size_t)B * nH);  // h_i, rounded, in the accumulation type
  for (int L = 0; L <= n; ++L) {
    const LayerInfo& li = lis[L];
    at::parallel_for(0, B, grain_for((int64_t)li.K * li.N), [&](int64_t r0, int64_t r1) {
      std::vector<A> u(maxK);
      for (int64_t row = r0; row < r1; ++row) {
        build_input<T, A>(d, li, (int)row, seed, x + row * d.D, &Hs[(size_t)row * nH], u.data());
        for (int j = 0; j < li.N; ++j) {
          const A z = dot_pairwise(u.data(), W[L] + (int64_t)j * li.K, li.K) + (A)bias[L][j];
          if (L < n)
            Z[(size_t)row * nH + L * H + j] = (T)z;
          else
            y[row * d.C + j] = (T)z;
        }
      }
    });
    if (L == n) break;
    // batch mean, biased variance (two passes), r = 1/sqrt(var + eps), unbiased variance
    A* st = stats + (int64_t)L * 3 * H;
    at::parallel_for(0, H, grain_for(2 * B), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        double s = 0.0, m2 = 0.0;
        for (int64_t row = 0; row < B; ++row) s += (double)Z[(size_t)row * nH + L * H + j];
        const double mean = s / (double)B;
        for (int64_t row = 0; row < B; ++row) {
          const double dv = (double)Z[(size_t)row * nH + L * H + j] - mean;
          m2 += dv * dv;
        }
        st[j] = (A)mean;
        st[H + j] = (A)(1.0 / std::sqrt(m2 / (double)B + eps));
        st[2 * H + j] = (A)(m2 / (double)(B - 1));
      }
    });
    at::parallel_for(0, B, grain_for(H), [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row)
        for (int j = 0; j < H; ++j) {
          const size_t e = (size_t)row * nH + L * H + j;
          A a = ((A)Z[e] - st[j]) * st[H + j];
          if (!gamma.empty()) a = a * gamma[L][j] + beta[L][j];
          Hs[e] = (A)(T)(a < A(0) ? A(0) : a);  // ReLU keeps NaN
        }
    });
  }
  if (hidden)
    for (size_t e = 0; e < Hs.size(); ++e) hidden[e] = (T)Hs[e];
  if (zout) std::copy(Z.begin(), Z.end(), zout);
}

// The backward, layer by layer from the output: dh_i is complete once layer i + 1 (and the
// output layer) are done; da_i = dh_i where h_i > 0; its batch sums give dbeta_i = sum da_i,
// dgamma_i = sum da_i xhat_i (float64, fixed row order) and
// dz_i = gamma_i r_i (da_i - dbeta_i / B - xhat_i dgamma_i / B).
template <typename T>
void bn_backward_cpu(const HeadDims& d, const T* gy, const T* x, const std::vector<const T*>& W,
                     const std::vector<const cpu_acc_t<T>*>& gamma, const T* hidden, const T* z,
                     const cpu_acc_t<T>* stats, uint64_t seed, T* gx, T* gparams,
                     cpu_acc_t<T>* gbn) {
  using A = cpu_acc_t<T>;
  const int n = d.n, H = d.H, nH = d.n * d.H;
  const int64_t B = d.B;
  std::vector<LayerInfo> lis(n + 1);
  std::vector<int64_t> uoff, zoff;
  layer_offsets(d, lis, uoff, zoff);
  const int64_t ul = uoff[n + 1], zl = zoff[n + 1];
  std::vector<A> U((size_t)B * ul), DZ((size_t)B * zl), DH((size_t)B * nH, A(0)),
      GX((size_t)B * d.D, A(0));
  at::parallel_for(0, B, grain_for(ul), [&](int64_t r0, int64_t r1) {
    std::vector<A> h(nH);
    for (int64_t row = r0; row < r1; ++row) {
      for (int j = 0; j < nH; ++j) h[j] = (A)hidden[row * nH + j];
      for (int L = 0; L <= n; ++L)
        build_input<T, A>(d, lis[L], (int)row, seed, x + row * d.D, h.data(),
                          &U[(size_t)row * ul + uoff[L]]);
    }
  });
  auto da = [&](int64_t row, int L, int j) {  // ReLU backward as torch (NaN h passes)
    const size_t e = (size_t)row * nH + L * H + j;
    return (A)hidden[e] <= A(0) ? A(0) : DH[e];
  };
  for (int L = n; L >= 0; --L) {
    const LayerInfo& li = lis[L];
    if (L < n) {
      const A* st = stats + (int64_t)L * 3 * H;
      A* g = gbn + (int64_t)L * 2 * H;
      at::parallel_for(0, H, grain_for(2 * B), [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          double s_da = 0.0, s_dax = 0.0;
          for (int64_t row = 0; row < B; ++row) {
            const double a = (double)da(row, L, (int)j);
            s_da += a;
            s_dax += a * ((double)z[row * nH + L * H + j] - (double)st[j]) * (double)st[H + j];
          }
          g[j] = (A)s_dax;
          g[H + j] = (A)s_da;
        }
      });
    }
    at::parallel_for(0, B, grain_for((int64_t)li.K * li.N), [&](int64_t r0, int64_t r1) {
      VectorSum<A> du;
      for (int64_t row = r0; row < r1; ++row) {
        A* dz = &DZ[(size_t)row * zl + zoff[L]];
        if (L == n) {
          for (int j = 0; j < d.C; ++j) dz[j] = (A)gy[row * d.C + j];
        } else {
          const A* st = stats + (int64_t)L * 3 * H;
          const A* g = gbn + (int64_t)L * 2 * H;
          for (int j = 0; j < H; ++j) {
            const A xhat = ((A)z[row * nH + L * H + j] - st[j]) * st[H + j];
            const A scale = (gamma.empty() ? A(1) : gamma[L][j]) * st[H + j];
            dz[j] = scale * (da(row, L, j) - g[H + j] / (A)B - xhat * g[j] / (A)B);
          }
        }
        input_grad(d, li, (int)row, seed, dz, W[L], du, &GX[(size_t)row * d.D],
                   &DH[(size_t)row * nH]);
      }
    });
  }
  for (size_t e = 0; e < GX.size(); ++e) gx[e] = (T)GX[e];
  weight_grads(d, lis, uoff, zoff, U, DZ, gparams);
}

template <typename A>
std::vector<const A*> acc_ptrs(const std::vector<at::Tensor>& ts) {
  std::vector<const A*> out;
  for (const auto& t : ts) out.push_back(t.data_ptr<A>());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_bn_forward_cpu(
    const at::Tensor& x_, at::TensorList weights_, at::TensorList biases_,
    at::TensorList bn_weights_, at::TensorList bn_biases_, const std::optional<at::Tensor>& seed,
    int64_t num_splits, double dropout, double eps, bool save_for_backward) {
  const char* op = "spinalkern::cuda_head_bn_forward";
  const HeadDims d = check_bn_forward_args(op, x_, weights_, biases_, bn_weights_, bn_biases_,
                                           seed, num_splits, dropout, eps);
  TORCH_CHECK_VALUE(x_.device().is_cpu(), op, ": the CPU implementation got x on ", x_.device());
  const at::Tensor x = x_.contiguous();
  const auto weights = contiguous_all(weights_), biases = contiguous_all(biases_);
  const auto gammas = contiguous_all(bn_weights_), betas = contiguous_all(bn_biases_);
  const int64_t nH = (int64_t)d.n * d.H;
  at::Tensor y = at::empty({d.B, d.C}, x.options());
  const std::vector<int64_t> saved_shape =
      save_for_backward ? std::vector<int64_t>{d.B, nH} : std::vector<int64_t>{0};
  at::Tensor hidden = at::empty(saved_shape, x.options());
  at::Tensor z = at::empty(hidden.sizes(), x.options());
  at::Tensor stats = at::empty({d.n, 3, d.H}, x.options().dtype(bn_acc_dtype(x)));
  const uint64_t s = seed_value(d, seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "head_bn_forward_cpu",
                                  [&] {
    using A = cpu_acc_t<scalar_t>;
    bn_forward_cpu<scalar_t>(d, x.data_ptr<scalar_t>(), data_ptrs<scalar_t>(weights),
                             data_ptrs<scalar_t>(biases), acc_ptrs<A>(gammas), acc_ptrs<A>(betas),
                             eps, s, y.data_ptr<scalar_t>(),
                             save_for_backward ? hidden.data_ptr<scalar_t>() : nullptr,
                             save_for_backward ? z.data_ptr<scalar_t>() : nullptr,
                             stats.data_ptr<A>());
  });
  return {y, hidden, z, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_bn_backward_cpu(
    const at::Tensor& grad_y_, const at::Tensor& x_, at::TensorList weights_,
    at::TensorList bn_weights_, const at::Tensor& hidden_, const at::Tensor& z_,
    const at::Tensor& stats_, const std::optional<at::Tensor>& seed, int64_t num_splits,
    double dropout) {
  const char* op = "spinalkern::cuda_head_bn_backward";
  const HeadDims d = check_bn_backward_args(op, grad_y_, x_, weights_, bn_weights_, hidden_, z_,
                                            stats_, seed, num_splits, dropout);
  TORCH_CHECK_VALUE(x_.device().is_cpu(), op, ": the CPU implementation got x on ", x_.device());
  const at::Tensor x = x_.contiguous(), grad_y = grad_y_.contiguous(),
                   hidden = hidden_.contiguous(), z = z_.contiguous(), stats = stats_.contiguous();
  const auto weights = contiguous_all(weights_), gammas = contiguous_all(bn_weights_);
  at::Tensor grad_x = at::empty({d.B, d.D}, x.options());
  at::Tensor grad_params = at::empty({param_offset(d, d.n + 1)}, x.options());
  at::Tensor grad_bn = at::empty({d.n, 2, d.H}, stats.options());
  const uint64_t s = seed_value(d, seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "head_bn_backward_cpu", [&] {
    using A = cpu_acc_t<scalar_t>;
    bn_backward_cpu<scalar_t>(d, grad_y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                              data_ptrs<scalar_t>(weights), acc_ptrs<A>(gammas),
                              hidden.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                              stats.data_ptr<A>(), s, grad_x.data_ptr<scalar_t>(),
                              grad_params.data_ptr<scalar_t>(), grad_bn.data_ptr<A>());
  });
  return {grad_x, grad_params, grad_bn};
}

std::tuple<at::Tensor, at::Tensor> head_forward_cpu(
    const at::Tensor& x_, at::TensorList weights_, at::TensorList biases_,
    const std::optional<at::Tensor>& seed, int64_t kind, int64_t num_splits, double dropout,
    bool save_hidden) {
  const char* op = "spinalkern::cuda_head_forward";
  const HeadDims d = check_head_args(op, x_, weights_, seed, kind, num_splits, dropout);
  check_biases(op, x_, weights_, biases_);
  TORCH_CHECK_VALUE(x_.device().is_cpu(), op, ": the CPU implementation got x on ", x_.device());
  const at::Tensor x = x_.contiguous();
  const auto weights = contiguous_all(weights_);
  const auto biases = contiguous_all(biases_);
  at::Tensor y = at::empty({d.B, d.C}, x.options());
  at::Tensor hidden = save_hidden ? at::empty({d.B, (int64_t)d.n * d.H}, x.options())
                                  : at::empty({0}, x.options());
  if (d.B == 0) return {y, hidden};
  const uint64_t s = seed_value(d, seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "head_forward_cpu",
                                  [&] {
    forward_cpu<scalar_t>(d, x.data_ptr<scalar_t>(), data_ptrs<scalar_t>(weights),
                          data_ptrs<scalar_t>(biases), s, y.data_ptr<scalar_t>(),
                          save_hidden ? hidden.data_ptr<scalar_t>() : nullptr);
  });
  return {y, hidden};
}

std::tuple<at::Tensor, at::Tensor> head_backward_cpu(
    const at::Tensor& grad_y_, const at::Tensor& x_, at::TensorList weights_,
    const at::Tensor& hidden_, const std::optional<at::Tensor>& seed, int64_t kind,
    int64_t num_splits, double dropout) {
  const char* op = "spinalkern::cuda_head_backward";
  const HeadDims d = check_head_args(op, x_, weights_, seed, kind, num_splits, dropout);
  check_backward_tensors(op, d, x_, grad_y_, hidden_);
  TORCH_CHECK_VALUE(x_.device().is_cpu(), op, ": the CPU implementation got x on ", x_.device());
  const at::Tensor x = x_.contiguous(), grad_y = grad_y_.contiguous(),
                   hidden = hidden_.contiguous();
  const auto weights = contiguous_all(weights_);
  at::Tensor grad_x = at::empty({d.B, d.D}, x.options());
  at::Tensor grad_params = at::empty({param_offset(d, d.n + 1)}, x.options());
  if (d.B == 0) return {grad_x, grad_params.zero_()};
  const uint64_t s = seed_value(d, seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "head_backward_cpu",
                                  [&] {
    backward_cpu<scalar_t>(d, grad_y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                           data_ptrs<scalar_t>(weights), hidden.data_ptr<scalar_t>(), s,
                           grad_x.data_ptr<scalar_t>(), grad_params.data_ptr<scalar_t>());
  });
  return {grad_x, grad_params};
}

at::Tensor keep_mask_cpu(const at::Tensor& seed, int64_t stream, int64_t rows, int64_t cols,
                         double p) {
  const char* op = "spinalkern::cuda_keep_mask";
  TORCH_CHECK_VALUE(seed.scalar_type() == at::kLong && seed.numel() == 1, op,
                    ": seed must be a one-element int64 tensor");
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0 && rows <= INT32_MAX && cols <= INT32_MAX, op,
                    ": rows and cols must be in [0, 2^31)");
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1), got ", p);
  at::Tensor out = at::empty({rows, cols}, seed.options().dtype(at::kBool));
  const uint64_t s = (uint64_t)seed.item<int64_t>();
  const uint32_t thr = keep_threshold(p);
  bool* o = out.data_ptr<bool>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < cols; ++c)
        o[r * cols + c] = keep_element(s, (int)c, (int)r, (int)stream, thr);
  });
  return out;
}

}  // namespace
}  // namespace spinalkern

TORCH_LIBRARY_FRAGMENT(spinalkern, m) {
  // A FRAGMENT: the Triton backend defines its ops in the same namespace from Python.
  m.def("cuda_head_forward" SK_HEAD_FORWARD_SCHEMA);
  m.def("cuda_head_backward" SK_HEAD_BACKWARD_SCHEMA);
  m.def("cuda_head_bn_forward" SK_HEAD_BN_FORWARD_SCHEMA);
  m.def("cuda_head_bn_backward" SK_HEAD_BN_BACKWARD_SCHEMA);
  m.def("cuda_keep_mask" SK_KEEP_MASK_SCHEMA);
}

TORCH_LIBRARY_IMPL(spinalkern, CPU, m) {
  m.impl("cuda_head_forward", &spinalkern::head_forward_cpu);
  m.impl("cuda_head_backward", &spinalkern::head_backward_cpu);
  m.impl("cuda_head_bn_forward", &spinalkern::head_bn_forward_cpu);
  m.impl("cuda_head_bn_backward", &spinalkern::head_bn_backward_cpu);
  m.impl("cuda_keep_mask", &spinalkern::keep_mask_cpu);
}
