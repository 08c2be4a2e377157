"""Load weights saved by the original SpinalNet / ProgressiveSpinalNet training scripts.

Those scripts name their layers ``fc_spinal_layer1`` .. ``fc_spinal_layerN`` and ``fc_out``,
each an ``nn.Sequential`` such as ``(Dropout, Linear, BatchNorm1d, ReLU)``, so their keys look
like ``fc_spinal_layer1.1.weight`` or ``fc_spinal_layer1.2.running_mean``.  A prefix (for the
whole model, e.g. ``module.``) is allowed.
"""
from __future__ import annotations

import re

import torch

_KEY = re.compile(r"^(?:.*\.)?(fc_spinal_layer(\d+)|fc_out)\.(?:(\d+)\.)?"
                  r"(weight|bias|running_mean|running_var|num_batches_tracked)$")


def convert_original_state_dict(state_dict: dict, head) -> dict:
    """Map original-script keys onto ``head``'s (``layers.i``, ``norms.i``, ``out``)."""
    # group the tensors of each original layer by their position in its Sequential
    groups: dict[tuple[str, int], dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in state_dict.items():
        m = _KEY.match(key)
        if not m:
            continue
        name, num, pos, field = m.groups()
        layer = ("out", 0) if name == "fc_out" else ("hidden", int(num) - 1)
        groups.setdefault(layer, {}).setdefault(int(pos or 0), {})[field] = value
    if not groups:
        raise ValueError("no fc_spinal_layerK / fc_out keys found in the state dict")
    n = head.spec.n
    found = sorted(i for kind, i in groups if kind == "hidden")
    if found != list(range(n)):
        raise ValueError(f"state dict has hidden layers {[i + 1 for i in found]}, the head "
                         f"expects fc_spinal_layer1..{n}")
    out = {}
    for (kind, i), modules in groups.items():
        prefix = "out" if kind == "out" else f"layers.{i}"
        # the first module with a 2-D weight is the Linear; a later 1-D weight is BatchNorm
        positions = sorted(modules)
        lin = next((p for p in positions if modules[p].get("weight") is not None
                    and modules[p]["weight"].dim() == 2), None)
        if lin is None:
            raise ValueError(f"no Linear weight found for {prefix}")
        out[f"{prefix}.weight"] = modules[lin]["weight"]
        out[f"{prefix}.bias"] = modules[lin]["bias"]
        for p in positions:
            if p == lin:
                continue
            if kind == "out" or head.norms is None:
                raise ValueError(f"{prefix} has a normalisation layer in the state dict but the "
                                 "head was built with batch_norm=False")
            for field, value in modules[p].items():
                out[f"norms.{i}.{field}"] = value
    return out


def load_original_state_dict(head, state_dict: dict, strict: bool = True):
    """Load an original-script state dict (``fc_spinal_layerK`` / ``fc_out`` keys) into
    ``head``; shapes are checked by ``load_state_dict``."""
    return head.load_state_dict(convert_original_state_dict(state_dict, head), strict=strict)
