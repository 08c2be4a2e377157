"""The training step, eager or captured once in a CUDA graph and replayed."""
from __future__ import annotations

import torch


class StepRunner:
    """Runs ``step_fn`` eagerly, or (CUDA) captures it once in a CUDA graph and replays it.

    The first ``warmup`` calls run eagerly on a side stream (as PyTorch's CUDA-graph notes
    require: lazy state such as optimizer buffers, cuDNN plans and torch.compile kernels is
    created there); the next call captures the step and replays it, and every later call just
    replays.  If the capture fails, ``reset_fn`` cleans up and the run continues eagerly.
    """

    def __init__(self, step_fn, use_graph: bool, warmup: int = 3, reset_fn=None, log=print):
        self.step_fn = step_fn
        self.use_graph = use_graph
        self.warmup = warmup
        self.reset_fn = reset_fn
        self.log = log
        self.graph = None
        self.calls = 0
        self.fallback_reason = None
        self.stream = torch.cuda.Stream() if use_graph else None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self) -> None:
        self.calls += 1
        if not self.use_graph:
            self.step_fn()
        elif self.graph is not None:
            self.graph.replay()
        elif self.calls <= self.warmup:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                self.step_fn()
            torch.cuda.current_stream().wait_stream(self.stream)
        else:
            self._capture_and_run()

    def _capture_and_run(self) -> None:
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.step_fn()
        except Exception as e:  # noqa: BLE001 - any capture problem means: run eagerly
            self.use_graph = False
            self.fallback_reason = f"{type(e).__name__}: {e}"
            self.log(f"CUDA graph capture failed, continuing eagerly ({self.fallback_reason})")
            torch.cuda.synchronize()
            if self.reset_fn is not None:
                self.reset_fn()
            self.step_fn()
            return
        self.graph = graph
        graph.replay()  # capturing records the step without running it
