#!/usr/bin/env python
"""Latency and memory model of the CUDA kernels for the goals of their design (docs/cuda.md),
until GPU benchmarks replace it.  No GPU is used and no GPU number here is measured.

    python -m bench.cuda_latency_model [--out results/kernels/cuda_model.json] [--markdown FILE]

Inputs, each named with its source:
* the launch plans (tile sizes, CTAs, what is on chip) from the extension's own planner:
  torch.ops.spinalkern.cuda_launch_plan, or the CPU emulator's launch_plan (built on demand);
* registers per kernel (occupancy) from results/kernels/cuda_sass.json;
* the device: numbers measured on the project's GPU machine (an H200: device-to-device copy
  bandwidth, cuBLAS bf16 8192^3 rate), the H200 datasheet, and explicitly *assumed* ones
  (ASSUMED below);
* eager PyTorch's work, measured on CPU: the kernels it runs for forward + backward (ops that
  compute, counted with a TorchDispatchMode) and the bytes it saves for backward
  (saved_tensors_hooks), for the same head, batch and dtype.

Each kernel: time = KERNEL_NODE_US + waves x (per-CTA time), the per-CTA time being the
largest of its streams (weights from L2, activations from HBM, tensor-core math) plus the
serial costs of its layer chain.  Dropout masks: Philox work spread over every SM.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEVICE = {
    "name": "H200 SXM (the project's GPU machine)",
    "sms": 132,
    "clock_ghz": 1.98,                 # NVIDIA H200 boost clock (datasheet)
    "smem_per_sm": 228 * 1024,         # Hopper: 228 KB of shared memory per SM (datasheet)
    "hbm_tb_s": 4.3,                   # measured: device-to-device copy on the GPU machine
    "bf16_dense_tflops": 790.0,        # measured: cuBLAS bf16 8192^3 matmul on the GPU machine
}
ASSUMED = {
    "mma_sync_fraction": 0.5,          # mma.sync (HMMA m16n8k16) sustains half the wgmma rate
    "fp32_simt_tflops": 60.0,          # FFMA rate of the SIMT kernels (H200 peak 67)
    "l2_bytes_per_clk_per_sm": 64,     # L2 -> SM bandwidth of one SM
    "l2_tb_s": 5.5,                    # aggregate L2 bandwidth
    "philox_instructions": 65,         # per keep bit: 10 rounds of 2 IMAD.WIDE + 2 LOP3
    "int_lanes_per_clk_per_sm": 64,    # integer (IMAD/LOP3) throughput of one SM
    "layer_overhead_us": 0.3,          # per layer of a fused chain: epilogue, barriers, U build
    "round_trip_us": 0.6,              # one dependent global-memory round trip (pipeline fill)
    "kernel_node_us": 2.0,             # one small kernel in a CUDA graph (launch, ramp, drain)
    "cluster_exchange_us": 0.3,        # per layer: DSMEM exchange of h + cluster barrier
}

HEAD = dict(kind=0, D=256, H=128, n=4, C=10, S=2)  # Spinal VGG-5 head (SpinalNet paper)


def planner():
    import torch
    from spinalkern import cuda_backend
    if cuda_backend.has_cuda_kernels():
        return torch.ops.spinalkern.cuda_launch_plan, "torch.ops.spinalkern.cuda_launch_plan"
    from torch.utils import cpp_extension
    build = os.path.join(ROOT, "build", "emu")
    os.makedirs(build, exist_ok=True)
    cpp_extension.load(name="spinalkern_emu", sources=[os.path.join(ROOT, "csrc", "emu", "emu_ops.cpp")],
                       extra_cflags=["-O2", "-std=c++17", "-Wno-unknown-pragmas"],
                       build_directory=build, is_python_module=False)
    return torch.ops.spinalkern_emu.launch_plan, "the CPU emulator's launch_plan (same planner)"


def registers():
    with open(os.path.join(ROOT, "results", "kernels", "cuda_sass.json")) as f:
        return {k["kernel"]: k["regs"] for k in json.load(f)["kernels"] if k["arch"] == "90"}


def layer_shapes(h):
    D, H, n, C, S = h["D"], h["H"], h["n"], h["C"], h["S"]
    if h["kind"] == 0:
        seg = D // S
        return [(H, seg)] + [(H, seg + H)] * (n - 1) + [(C, n * H)]
    return [(H, D + i * H) for i in range(n)] + [(C, D + n * H)]


def pad16(v):
    return (v + 15) // 16 * 16


class Model:
    def __init__(self, h, B, dtype_bytes, tc, p, plan, regs):
        self.h, self.B, self.sz, self.tc, self.p, self.plan, self.regs = h, B, dtype_bytes, tc, p, plan, regs
        clk = DEVICE["clock_ghz"] * 1e9
        sms = DEVICE["sms"]
        rate = (DEVICE["bf16_dense_tflops"] * ASSUMED["mma_sync_fraction"] if tc
                else ASSUMED["fp32_simt_tflops"]) * 1e12
        self.flops_sm = rate / sms
        self.l2_sm = ASSUMED["l2_bytes_per_clk_per_sm"] * clk
        self.hbm_sm = DEVICE["hbm_tb_s"] * 1e12 / sms
        shapes = layer_shapes(h)
        self.w_bytes = sum(N * pad16(K) for N, K in shapes) * dtype_bytes
        self.macs_row = sum(N * K for N, K in shapes)
        self.n_params = sum(N * K + N for N, K in shapes)
        self.layers = h["n"] + 1

    def occupancy(self, name, smem):
        regs = self.regs.get(name.replace("head_", ""), 255)
        by_smem = DEVICE["smem_per_sm"] // max(smem + 1024, 1)
        by_regs = 65536 // (256 * max(regs, 1))
        return max(1, min(by_smem, by_regs))

    def waves(self, ctas, name, smem):
        return math.ceil(ctas / (DEVICE["sms"] * self.occupancy(name, smem)))

    def masks(self):
        if self.p == 0:
            return 0.0, 0
        widths = [K for _, K in layer_shapes(self.h)] if self.h["kind"] == 0 else [self.h["D"]]
        bits = self.B * sum(widths)
        instr = bits * ASSUMED["philox_instructions"]
        t = instr / (DEVICE["sms"] * ASSUMED["int_lanes_per_clk_per_sm"] * DEVICE["clock_ghz"] * 1e9)
        return ASSUMED["kernel_node_us"] + t * 1e6, self.B * sum(math.ceil(w / 32) for w in widths) * 4

    def chain_kernel(self, key, rows, extra_bytes=0.0):
        pk = self.plan[key]
        t_w = self.w_bytes / self.l2_sm
        t_mma = 2 * rows * self.macs_row / self.flops_sm
        t_in = (rows * self.h["D"] * self.sz + extra_bytes) / self.hbm_sm
        serial = self.layers * ASSUMED["layer_overhead_us"] + ASSUMED["round_trip_us"]
        t_cta = max(t_w, t_mma, t_in) * 1e6 + serial
        w = self.waves(pk["ctas"], pk["kernel"], pk["smem"]["total"])
        return ASSUMED["kernel_node_us"] + w * t_cta, dict(per_cta_us=t_cta, waves=w,
                                                          weights_us=t_w * 1e6, math_us=t_mma * 1e6,
                                                          inputs_us=t_in * 1e6)

    def forward(self):
        rows = int(self.plan["forward"]["kernel"].split(",")[1].strip(" >"))
        return self.chain_kernel("forward", rows)

    def forward_variant(self, rows, split=1):
        """Per-CTA forward time (µs) with `rows`-row tiles, each layer's outputs split over
        `split` CTAs of a cluster (weights and math divided, one h exchange per layer)."""
        t_w = self.w_bytes / split / self.l2_sm
        t_mma = 2 * rows * self.macs_row / split / self.flops_sm
        t_in = rows * self.h["D"] * self.sz / self.hbm_sm
        serial = self.layers * ASSUMED["layer_overhead_us"] + ASSUMED["round_trip_us"]
        if split > 1:
            serial += self.layers * ASSUMED["cluster_exchange_us"]
        ctas = math.ceil(self.B / rows) * split
        waves = math.ceil(ctas / DEVICE["sms"])
        return dict(rows=rows, split=split, ctas=ctas,
                    us=round(ASSUMED["kernel_node_us"] + waves * (max(t_w, t_mma, t_in) * 1e6 + serial), 2))

    def chain(self):
        pk = self.plan["chain"]
        rows = int(pk["kernel"].split(",")[1].strip(" >"))
        nH = self.h["n"] * self.h["H"]
        extra = rows * nH * self.sz  # the saved hidden tile
        if not pk["gx_smem"]:
            extra += rows * self.h["D"] * 4 * 2 * math.ceil(self.h["n"] / self.h["S"])
        if not pk["dh_smem"]:
            extra += rows * nH * 4 * 3
        return self.chain_kernel("chain", rows, extra)

    def wgrad(self):
        pk = self.plan["wgrad"]
        bm, bn = (64, 128) if self.tc else (64, 64)
        rows = pk["chunk_rows"]
        t_mma = 2 * bm * bn * rows / self.flops_sm
        t_in = rows * (bm + bn) * self.sz / self.l2_sm
        t_cta = max(t_mma, t_in) * 1e6 + ASSUMED["round_trip_us"]
        w = self.waves(pk["ctas"], pk["kernel"], pk["smem"]["total"])
        return ASSUMED["kernel_node_us"] + w * t_cta, dict(per_cta_us=t_cta, waves=w)

    def reduce(self):
        b = self.plan["wgrad"]["chunks"] * self.n_params * 4
        return ASSUMED["kernel_node_us"] + b / (DEVICE["hbm_tb_s"] * 1e12) * 1e6

    def temporaries(self):
        """Bytes alive in backward besides the returned tensors: hidden (saved by the forward),
        the dz workspace, the chunk partials, the masks (and global accumulators if any)."""
        h = self.h
        nH = h["n"] * h["H"]
        hidden = self.B * nH * self.sz
        dz = self.B * (h["n"] * pad16(h["H"]) + pad16(h["C"])) * self.sz
        partials = self.plan["wgrad"]["chunks"] * (self.n_params + 3) // 4 * 4 * 4
        _, masks = self.masks()
        glob = 0
        if not self.plan["chain"]["dh_smem"]:
            glob += self.B * nH * 4
        if not self.plan["chain"]["gx_smem"]:
            glob += self.B * h["D"] * 4
        return dict(hidden=hidden, dz=dz, partials=partials, masks=masks, accumulators=glob,
                    total=hidden + dz + partials + masks + glob)


def eager_measurements(B, p):
    """Kernels eager PyTorch runs for forward + backward, and bytes saved for backward (CPU)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from spinalkern import SpinalHead
    no_kernel = {"aten.t", "aten.detach", "aten.slice", "aten.view", "aten.expand",
                 "aten.empty_like", "aten._to_copy", "aten.ones_like", "aten.transpose",
                 "aten.unsqueeze", "aten.as_strided", "aten._unsafe_view", "aten.alias"}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if name not in no_kernel:
                self.ops[name] = self.ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    h = HEAD
    head = SpinalHead(h["D"], h["C"], h["H"], h["n"], h["S"], dropout=p, backend="torch").bfloat16()
    x = torch.randn(B, h["D"], dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(B, h["C"], dtype=torch.bfloat16)
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        saved[st.data_ptr()] = st.nbytes()
        return t
    with Count() as c:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = head(x)
        y.backward(gy)
    inputs = {q.data_ptr() for q in head.parameters()} | {x.data_ptr()}
    return dict(kernels=sum(c.ops.values()), ops=c.ops,
                gemms=c.ops.get("aten.mm", 0) + c.ops.get("aten.addmm", 0),
                saved_bytes=sum(v for k, v in saved.items() if k not in inputs))


def run():
    import torch
    plan_op, plan_src = planner()
    regs = registers()
    h = HEAD
    out = {"device": DEVICE, "assumed": ASSUMED, "plans_from": plan_src, "head": h, "goals": {}}

    def plan(B, p, dtype=torch.bfloat16):
        return json.loads(plan_op(h["kind"], B, h["D"], h["H"], h["n"], h["C"], h["S"], dtype, p))

    # Goal 1: forward + backward at B = 128 .. 1024, bf16, training (dropout 0.5 as the paper)
    g1 = []
    for B in (128, 1024):
        m = Model(h, B, 2, True, 0.5, plan(B, 0.5), regs)
        mask_us, _ = m.masks()
        fwd, fwd_d = m.forward()
        chain, chain_d = m.chain()
        wg, wg_d = m.wgrad()
        red = m.reduce()
        ours = 2 * mask_us + fwd + chain + wg + red
        e = eager_measurements(B, 0.5)
        eager = e["kernels"] * ASSUMED["kernel_node_us"]
        compile_floor = e["gemms"] * ASSUMED["kernel_node_us"]
        g1.append(dict(B=B, ours_us=round(ours, 1),
                       parts_us=dict(masks=round(2 * mask_us, 1), forward=round(fwd, 1),
                                     chain=round(chain, 1), wgrad=round(wg, 1), reduce=round(red, 1)),
                       forward_detail=fwd_d, chain_detail=chain_d, wgrad_detail=wg_d,
                       eager_kernels=e["kernels"], eager_graph_us=round(eager, 1),
                       compile_gemms=e["gemms"], compile_floor_us=round(compile_floor, 1),
                       speedup_vs_eager_graph=round(eager / ours, 2),
                       speedup_vs_compile_floor=round(compile_floor / ours, 2)))
    out["goals"]["fwd_bwd_small_batch"] = g1

    # Small batches: 16-row tiles (what ships) vs 32-row tiles vs a 4-CTA cluster split of N
    out["small_batch_scheme"] = [
        dict(B=B, variants=[m.forward_variant(16), m.forward_variant(32), m.forward_variant(16, 4)])
        for B in (128, 1024) for m in [Model(h, B, 2, True, 0.0, plan(B, 0.0), regs)]]

    # Goal 2: forward at B = 65536, bf16, inference, vs the roofline floor
    B = 65536
    m = Model(h, B, 2, True, 0.0, plan(B, 0.0), regs)
    fwd, fwd_d = m.forward()
    bytes_ = B * (h["D"] + h["C"]) * 2 + m.w_bytes
    flops = 2 * B * m.macs_row
    floor = max(bytes_ / (DEVICE["hbm_tb_s"] * 1e12), flops / (DEVICE["bf16_dense_tflops"] * 1e12)) * 1e6
    out["goals"]["forward_large_batch"] = dict(
        B=B, ours_us=round(fwd, 1), detail=fwd_d, floor_us=round(floor, 1),
        floor_bound="compute" if flops / DEVICE["bf16_dense_tflops"] > bytes_ / DEVICE["hbm_tb_s"] else "memory",
        fraction_of_floor=round(floor / fwd, 2))

    # Goal 3: peak temporary memory of forward + backward at B >= 1024
    g3 = []
    for B in (1024, 65536):
        m = Model(h, B, 2, True, 0.5, plan(B, 0.5), regs)
        ours = m.temporaries()
        e = eager_measurements(B, 0.5)
        g3.append(dict(B=B, ours_bytes=ours, eager_saved_bytes=e["saved_bytes"],
                       ratio=round(ours["total"] / e["saved_bytes"], 2)))
    out["goals"]["temporary_memory"] = g3
    return out


def markdown(res) -> str:
    lines = ["| goal | B | model estimate | comparison | ratio |", "|---|---|---|---|---|"]
    for g in res["goals"]["fwd_bwd_small_batch"]:
        p = g["parts_us"]
        lines.append(f"| fwd+bwd, bf16, dropout 0.5 | {g['B']} | {g['ours_us']} µs (masks {p['masks']}, "
                     f"forward {p['forward']}, chain {p['chain']}, wgrad {p['wgrad']}, reduce {p['reduce']}) | "
                     f"eager in a CUDA graph: {g['eager_kernels']} kernels ≈ {g['eager_graph_us']} µs; "
                     f"torch.compile ≥ its {g['compile_gemms']} GEMMs ≈ {g['compile_floor_us']} µs | "
                     f"{g['speedup_vs_eager_graph']}× eager, ≤ {g['speedup_vs_compile_floor']}× compile |")
    g = res["goals"]["forward_large_batch"]
    lines.append(f"| forward, bf16, inference | {g['B']} | {g['ours_us']} µs | roofline floor "
                 f"{g['floor_us']} µs ({g['floor_bound']}-bound) | {g['fraction_of_floor']} of the floor |")
    for g in res["goals"]["temporary_memory"]:
        o = g["ours_bytes"]
        lines.append(f"| temporary memory, fwd+bwd, bf16 | {g['B']} | {o['total'] / 2**20:.1f} MiB (hidden "
                     f"{o['hidden'] / 2**20:.1f}, dz {o['dz'] / 2**20:.1f}, partials {o['partials'] / 2**20:.1f}, "
                     f"masks {o['masks'] / 2**20:.2f}) | eager saves {g['eager_saved_bytes'] / 2**20:.1f} MiB "
                     f"for backward (a lower bound of its peak) | {g['ratio']}× |")
    lines += ["", "Forward latency at small batches (bf16, inference), by scheme:", "",
              "| B | 16-row tiles (shipped) | 32-row tiles | 16-row tiles, N split over a 4-CTA cluster |",
              "|---|---|---|---|"]
    for g in res["small_batch_scheme"]:
        v = g["variants"]
        lines.append(f"| {g['B']} | {v[0]['us']} µs ({v[0]['ctas']} CTAs) | {v[1]['us']} µs "
                     f"({v[1]['ctas']} CTAs) | {v[2]['us']} µs ({v[2]['ctas']} CTAs) |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "kernels", "cuda_model.json"))
    ap.add_argument("--markdown", help="also write the goal table as markdown")
    ap.add_argument("--docs", help="replace the table between the cuda-model markers of this file")
    args = ap.parse_args(argv)
    res = run()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    md = markdown(res)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    if args.docs:
        with open(args.docs) as f:
            text = f.read()
        begin, end = "<!-- cuda-model:begin -->\n", "<!-- cuda-model:end -->"
        i, j = text.index(begin) + len(begin), text.index(end)
        src = os.path.relpath(args.out, ROOT)
        with open(args.docs, "w") as f:
            f.write(text[:i] + f"_Generated by `python -m bench.cuda_latency_model --docs "
                    f"docs/cuda.md` into `{src}`; a model, not a measurement._\n\n" + md + text[j:])
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
