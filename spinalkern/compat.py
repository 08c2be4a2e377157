"""Load weights saved by the original SpinalNet / ProgressiveSpinalNet training scripts.

Those scripts name a head's layers in one of four ways (``N`` hidden layers, then the output):

    family     hidden layers                         output     used by
    spinalnet  fc_spinal_layer1 .. fc_spinal_layerN  fc_out     the transfer-learning and VGG-5 scripts
    mnist      fc1, fc1_1 .. fc1_(N-1)               fc2        the MNIST CNN script (6 x 8 head)
    resnet     fc1 .. fcN                            fc_layer   the CIFAR ResNet scripts
    custom     fc1 .. fcN                            fcx        the customisable SpinalNet model

Each layer is an ``nn.Linear`` (keys ``fc1.weight``) or an ``nn.Sequential`` holding one
Linear and, for hidden layers, optionally a BatchNorm1d after it, e.g. ``(Dropout, Linear,
BatchNorm1d, ReLU)`` (keys ``fc_spinal_layer1.1.weight``, ``fc_spinal_layer1.2.running_mean``).
The keys may carry a prefix: a whole model's state dict (``conv1.weight`` ... beside the head's
keys) or a wrapper's ``module.``.  Dropout and ReLU hold no weights; the head must be built with
the original's sizes, dropout and BatchNorm choice.

All these heads feed hidden layer ``i`` with ``[input segment (i mod S); output of layer
i-1]`` in that order, the segments being the S equal parts of the features (the halves, S = 2,
in the original scripts), and the output layer with ``[h_1; ...; h_N]``: the layout of
:class:`SpinalHead` (``spinalkern.spec``), so the weights are copied unchanged.
"""
from __future__ import annotations

import re

import torch

_FIELDS = "weight|bias|running_mean|running_var|num_batches_tracked"
_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)"
                  r"(?P<name>fc_spinal_layer\d+|fc_out|fc_layer|fcx|fc\d+(?:_\d+)?)\."
                  rf"(?:(?P<pos>\d+)\.)?(?P<field>{_FIELDS})$")

FAMILIES = ("spinalnet", "mnist", "resnet", "custom")


def _family(names: set[str]) -> str | None:
    """Which naming family a set of layer names (under one prefix) belongs to, if any."""
    if any(n.startswith("fc_spinal_layer") for n in names) or "fc_out" in names:
        return "spinalnet"
    if "fc_layer" in names:
        return "resnet"
    if "fcx" in names:
        return "custom"
    if any("_" in n for n in names):  # fc1_1 ...
        return "mnist"
    return None  # e.g. only fc1/fc2: a plain MLP, or squeeze-excitation convs in a backbone


def _layer_index(family: str, name: str) -> int | None:
    """Hidden layer index (0-based) of ``name``; None for the output layer.  ValueError for a
    name that does not belong to ``family``."""
    out = {"spinalnet": "fc_out", "mnist": "fc2", "resnet": "fc_layer", "custom": "fcx"}[family]
    if name == out:
        return None
    if family == "spinalnet":
        m = re.fullmatch(r"fc_spinal_layer(\d+)", name)
    elif family == "mnist":
        m = re.fullmatch(r"fc1(?:_(\d+))?", name)
        if m:
            return int(m.group(1) or 0)
    else:
        m = re.fullmatch(r"fc(\d+)", name)
    if m and int(m.group(1)) >= 1:
        return int(m.group(1)) - 1
    raise ValueError(f"layer {name!r} does not belong to the {family} naming family "
                     f"(see spinalkern.compat)")


def _groups(state_dict: dict):
    """{prefix: {layer name: {position in its Sequential: {field: tensor}}}}; a prefix holding
    fc_spinal_layerK / fc_out keys keeps only those (that naming is unambiguous)."""
    groups: dict[str, dict[str, dict[int, dict[str, torch.Tensor]]]] = {}
    for key, value in state_dict.items():
        m = _KEY.match(key)
        if m and isinstance(value, torch.Tensor):
            pos = int(m["pos"]) if m["pos"] is not None else -1  # -1: a plain Linear
            groups.setdefault(m["prefix"], {}).setdefault(m["name"], {}).setdefault(
                pos, {})[m["field"]] = value
    for prefix, layers in groups.items():
        if _family(set(layers)) == "spinalnet":
            groups[prefix] = {k: v for k, v in layers.items()
                              if k.startswith("fc_spinal_layer") or k == "fc_out"}
    return groups


def _is_head(layers) -> bool:
    """Every layer holds exactly one 2-D (Linear) weight (rules out convolutions)."""
    for modules in layers.values():
        dims = [f["weight"].dim() for f in modules.values() if "weight" in f]
        if dims.count(2) != 1 or any(d > 2 for d in dims):
            return False
    return True


def find_original_head(state_dict: dict, prefix: str | None = None) -> tuple[str, str]:
    """(prefix, family) of the original-script head in ``state_dict``."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    groups = _groups(state_dict)
    if prefix is not None:
        if prefix and not prefix.endswith("."):
            prefix += "."
        groups = {p: g for p, g in groups.items() if p == prefix}
    found = [(p, _family(set(g))) for p, g in groups.items()]
    found = [(p, f) for p, f in found if f is not None and _is_head(groups[p])]
    if not found:
        where = f" under prefix {prefix!r}" if prefix is not None else ""
        raise ValueError(
            f"no original SpinalNet head found in the state dict{where}: expected the keys of "
            "one of the families fc_spinal_layerK/fc_out, fc1/fc1_K/fc2, fc1..fcN/fc_layer or "
            "fc1..fcN/fcx (see spinalkern.compat)")
    if len(found) > 1:
        raise ValueError(f"the state dict holds several original heads, under the prefixes "
                         f"{sorted(p for p, _ in found)}; pass prefix= to choose one")
    return found[0]


def convert_original_state_dict(state_dict: dict, head, prefix: str | None = None) -> dict:
    """Map an original-script head's keys onto ``head``'s (``layers.i``, ``norms.i``, ``out``)."""
    prefix, family = find_original_head(state_dict, prefix)
    layers = _groups(state_dict)[prefix]
    by_index: dict[int | None, str] = {}
    for name in layers:
        by_index[_layer_index(family, name)] = name
    n = head.spec.n
    hidden = sorted(i for i in by_index if i is not None)
    if None not in by_index:
        raise ValueError(f"the {family} head in the state dict has no output layer")
    if hidden != list(range(n)):
        names = {"spinalnet": f"fc_spinal_layer1..{n}", "mnist": f"fc1, fc1_1..fc1_{n - 1}",
                 "resnet": f"fc1..fc{n}", "custom": f"fc1..fc{n}"}[family]
        raise ValueError(f"the state dict's {family} head has hidden layers "
                         f"{[by_index[i] for i in hidden]}, the head expects {n}: {names}")
    expected = head.state_dict()
    out = {}
    for index, name in by_index.items():
        target = "out" if index is None else f"layers.{index}"
        modules = layers[name]
        positions = sorted(modules)
        lin = next(p for p in positions if modules[p].get("weight") is not None
                   and modules[p]["weight"].dim() == 2)
        for field in ("weight", "bias"):
            if field not in modules[lin]:
                raise ValueError(f"{prefix}{name}: the Linear has no {field} in the state dict")
            out[f"{target}.{field}"] = modules[lin][field]
        for p in positions:
            if p == lin:
                continue
            if index is None or head.norms is None:
                raise ValueError(f"{prefix}{name} has a normalisation layer in the state dict but "
                                 "the head has none there (built with batch_norm=False?)")
            for field, value in modules[p].items():
                out[f"norms.{index}.{field}"] = value
    for key, value in out.items():
        if key in expected and tuple(expected[key].shape) != tuple(value.shape):
            raise ValueError(f"shape mismatch for the head's {key}: the state dict has "
                             f"{tuple(value.shape)}, the head {tuple(expected[key].shape)} "
                             f"(build the head with the original's sizes: {head.spec})")
    return out


def load_original_state_dict(head, state_dict: dict, strict: bool = True,
                             prefix: str | None = None):
    """Load an original-script head's weights (any family above) into ``head``.

    ``state_dict`` may be the head's own or a whole model's; ``prefix`` selects one head when
    several are present.  Returns ``head.load_state_dict``'s result.
    """
    return head.load_state_dict(convert_original_state_dict(state_dict, head, prefix),
                                strict=strict)
