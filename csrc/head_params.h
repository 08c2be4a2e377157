// Kernel parameters: what the host (head_launch.h) hands to each kernel, by value.  A plan
// (head_plan.h) fixes the tile size, what lives in shared memory and the SmemLayout; the
// kernels read their regions' offsets from it and never recompute them.
#pragma once

#include "head_traits.h"

namespace spinalkern {
namespace kern {

// ---- forward -------------------------------------------------------------------------------
struct ForwardPlan {
  int bm;           // rows per CTA (a compiled FwdCfg)
  bool x_res;       // the x row tile is copied to shared memory (cp.async) in the prologue
  bool h_res;       // h_0..h_{n-1} stay in shared memory (else: a global scratch)
  bool use_u;       // A operand = the U buffer, rebuilt per layer (dropout, or a non-resident
                    // part); else A is read in place from the resident x and h
  bool interleave;  // spinal output accumulated block by block as soon as h_i exists
  int hslots;       // h blocks kept in shared memory: h_i lives in slot i % hslots
  int act_pitch;    // row pitch (elements) of the Act region: [x padded | hslots * pad16(H)]
  int act_hcol;     // first h column of Act (the padded x width, or 0 without resident x)
  int u_pitch;      // row pitch of U
  SmemLayout smem;
};

template <typename T>
struct ForwardParams {
  const T* x;                    // (B, D), natural layout
  const T* w[kMaxLayers + 1];    // W_0..W_{n-1}, W_out in the padded layout of u_L
  const T* b[kMaxLayers + 1];
  const uint32_t* masks;         // dropout keep bits (see mask_offset), or nullptr
  T* y;                          // (B, C)
  T* hidden;                     // (B, n*H) output, or nullptr
  T* hscratch;                   // (B, n*pad16(H)) h storage when !plan.h_res, else nullptr
  HeadDims d;
  ForwardPlan plan;
};

// ---- backward ------------------------------------------------------------------------------
struct ChainPlan {
  int bm;           // rows per CTA (a compiled ChainCfg)
  bool dh_smem;     // fp32 dh accumulators in shared memory (else global workspace)
  bool gx_smem;     // fp32 grad_x accumulators in shared memory (else global workspace)
  bool ht_smem;     // the row tile of hidden copied to shared memory in the prologue
  int dz_pitch;     // row pitch (elements) of the Dz region
  SmemLayout smem;
};

struct WgradPlan {
  int tiles;        // BM x BN tiles over dW_0..dW_out (blockIdx.x)
  int chunk_rows;   // batch rows per chunk (a multiple of BK), chunks = blockIdx.y
  int chunks;
  SmemLayout smem;
};

template <typename T>
struct BackwardParams {
  using A = acc_t<T>;
  const T* grad_y;               // (B, C)
  const T* hidden;               // (B, n*H) post-ReLU activations of the forward
  const T* xu;                   // x in the padded layout (B, x_pad_width), 16-byte aligned
  const T* hu;                   // hidden in the padded layout (B, h_pad_width), aligned
  const T* w[kMaxLayers + 1];    // weights in the padded layout
  const uint32_t* masks;         // dropout keep bits (see mask_offset), or nullptr
  T* dz;                         // (B, ldz) workspace: [dz_0 | .. | dz_{n-1} | dz_n], padded
  int ldz;                       // h_pad_width + pad16(C)
  A* dh_g;                       // (B, n*H) dh accumulators when !chain.dh_smem
  A* gx_g;                       // (B, D) grad_x accumulators when !chain.gx_smem
  T* grad_x;                     // (B, D)
  A* partials;                   // (chunks, ldp) per-chunk dW/db partials
  int64_t ldp;                   // num_params rounded up to 16 bytes
  T* grad_params;                // (num_params,)
  int64_t num_params;
  HeadDims d;
  ChainPlan chain;
  WgradPlan wg;
};

// ---- helpers -----------------------------------------------------------------------------
// Packs rows of a natural layout [a blocks of wa columns | b blocks of wb] into the padded
// layout [a blocks of pad16(wa) | b blocks of pad16(wb)] with zeros in the padding.
template <typename T>
struct PackJob {
  const T* src;
  T* dst;
  int64_t rows;
  int a, wa, b, wb;
};
template <typename T>
struct PackParams {
  PackJob<T> job[kMaxLayers + 3];
  int njobs;
};

}  // namespace kern
}  // namespace spinalkern
