"""bench.tune: the CPU smoke mode of the tuning sweep, and the candidates it would time on a
GPU (each builds a plan; the resource checker compiles such plans for sm_90)."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

from spinalkern import triton_plan as tp
from spinalkern.spec import HeadSpec

from conftest import HAS_CUDA

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tune():
    from bench import tune
    return tune


@pytest.mark.skipif(HAS_CUDA, reason="the smoke mode runs the kernels in the interpreter")
def test_smoke_sweep_writes_a_table_the_launcher_reads(tmp_path):
    out = tmp_path / "table.json"
    assert _tune().main(["sweep", "--smoke", "--out", str(out)]) == 0
    table = tp.load_table(str(out))
    entries = table["gpus"]["cpu-interpreter-smoke"]
    [(key, by_dtype)] = entries.items()
    spec = HeadSpec("spinal", 40, 16, 2, 10, 2)
    assert key == tp.head_key(spec)
    entry = by_dtype["fp32"][str(tp.batch_bucket(150))]
    assert entry["candidates"] == 2 and entry["time_us"] > 0
    cfg = tp.table_config("cpu-interpreter-smoke", spec, torch.float32, 150, table)
    assert cfg == tp.HeadConfig.from_json(entry["config"])


def test_candidates_build_plans_for_every_shape():
    tune = _tune()
    for name, head in tune.HEADS.items():
        spec = HeadSpec(*head)
        for B in tune.BATCHES:
            cands = tune.candidates(spec, torch.bfloat16, B)
            assert cands[0] == tp.default_config(spec, torch.bfloat16, B, dropout=B <= 4096,
                                                 interpreting=False)
            assert len(cands) == len(set(cands)) > 1
            p, save = tune._step_args(B)
            for cfg in cands:
                plan = tp.build_plan(spec, torch.bfloat16, B, p, save, sms=132, config=cfg,
                                     interpreting=False)
                assert plan.fwd.grid[0] >= 1


def test_host_cost_result_is_recorded():
    path = ROOT / "results" / "kernels" / "triton_host_cost.json"
    result = json.loads(path.read_text())
    assert set(result["results_us"]) >= {"triton_binder_us", "op_forward_python_us",
                                         "op_backward_python_us"}
