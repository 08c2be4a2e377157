"""Transfer learning: put a spinal or progressive head on a (torchvision) model in one line.

    model = torchvision.models.resnet18(weights=...)
    spinalkern.replace_classifier(model, "spinal", num_classes=10)

:func:`replace_classifier` finds the model's final classifier ``nn.Linear`` -- or the module
named by ``target`` -- and replaces it with a :class:`SpinalHead` / :class:`ProgressiveHead`
whose ``in_features`` match, on the same device and in the same dtype.  Where it looks:

    ResNet, ResNeXt, Wide-ResNet, RegNet, ShuffleNet, GoogLeNet, Inception   model.fc
    VGG, AlexNet, MobileNet, EfficientNet, ConvNeXt, MNASNet                 model.classifier[-1]
    DenseNet                                                                 model.classifier
    ViT                                                                      model.heads.head
    Swin and other models with a final Linear named ``head``                  model.head

Auxiliary classifiers (GoogLeNet's ``aux1``/``aux2``, Inception's ``AuxLogits``) are left as
they are.  ``target`` may also name a classifier ``nn.Sequential`` made only of Linear / ReLU / Dropout /
BatchNorm1d layers (VGG's and AlexNet's ``classifier``): the head then replaces all of it and
reads the Sequential's input, as the SpinalNet paper's VGG-19-bn transfer runs did (their
parameter counts, Table III, match replacing the whole 25088 -> 4096 -> 4096 -> C classifier).
"""
from __future__ import annotations

from torch import nn

from .modules import ProgressiveHead, SpinalHead

# Head presets.  ``kind`` is "spinal" or "progressive"; every other entry is a default for the
# head's constructor, overridden by the caller's keyword arguments.
PRESETS: dict[str, dict] = {
    # SpinalHead's own defaults (128-wide layers, 4 layers, 2 splits, no dropout, no BatchNorm)
    "spinal": {"kind": "spinal"},
    "progressive": {"kind": "progressive"},
    # The VGG-style head of the SpinalNet transfer-learning runs: 4 spinal layers of 1024 on the
    # two halves of the features (SpinalNet paper, Table III, VGG-19-bn rows), each layer
    # Dropout(0.5) -> Linear -> BatchNorm1d -> ReLU, and Dropout(0.5) before the output Linear
    # (the layer structure of the original scripts' fc_spinal_layerK / fc_out heads).
    "spinal-vgg": {"kind": "spinal", "hidden_features": 1024, "num_layers": 4, "num_splits": 2,
                   "dropout": 0.5, "batch_norm": True},
    # The same head with 20-wide layers: the paper's Wide-ResNet-101-2 transfer head (Table III,
    # CIFAR-10, SVHN, CINIC-10 and STL-10 rows), to replace model.fc.
    "spinal-wrn": {"kind": "spinal", "hidden_features": 20, "num_layers": 4, "num_splits": 2,
                   "dropout": 0.5, "batch_norm": True},
    # ProgressiveSpinalNet's transfer runs on Wide-ResNet-101-2 (its results table: hidden
    # layer size 256, dropout 0.5); the number of layers is not stated there: 4, the default.
    "progressive-wrn": {"kind": "progressive", "hidden_features": 256, "dropout": 0.5},
}

# Where the classifier sits, in the order tried: (attribute path, what the model family is).
_KNOWN = (
    ("fc", "ResNet / ResNeXt / Wide-ResNet / RegNet / ShuffleNet / GoogLeNet / Inception"),
    ("classifier", "DenseNet (a Linear) or VGG / AlexNet / MobileNet / EfficientNet / ConvNeXt "
                   "(a Sequential ending in a Linear)"),
    ("heads.head", "ViT"),
    ("head", "Swin and other models whose last Linear is named head"),
)

_MLP_LAYERS = (nn.Linear, nn.ReLU, nn.Dropout, nn.BatchNorm1d, nn.Identity)


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def find_classifier(model: nn.Module) -> str:
    """The dotted name of ``model``'s final classifier ``nn.Linear`` (see the module doc)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for path, _ in _KNOWN:
        m = _get(model, path)
        if isinstance(m, nn.Linear):
            return path
        if isinstance(m, nn.Sequential) and len(m) and isinstance(m[-1], nn.Linear):
            return f"{path}.{len(m) - 1}"
    tried = "; ".join(f"model.{p} ({what})" for p, what in _KNOWN)
    raise ValueError(
        f"cannot find the classifier of {type(model).__name__}: none of these is an nn.Linear "
        f"or a Sequential ending in one: {tried}. Pass target='<dotted name of the Linear>' "
        "(see model.named_modules()).")


def _features(module: nn.Module, target: str) -> tuple[int, int]:
    """(in_features, out_features) of the Linear or pure-MLP Sequential to be replaced."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Sequential):
        linears = [m for m in module if isinstance(m, nn.Linear)]
        others = [type(m).__name__ for m in module if not isinstance(m, _MLP_LAYERS)]
        if linears and not others:
            return linears[0].in_features, linears[-1].out_features
        if others:
            raise ValueError(
                f"target {target!r} is a Sequential holding {others}: only a Linear, or a "
                "Sequential of Linear/ReLU/Dropout/BatchNorm1d layers, can be replaced by a head "
                "(its input must be the (batch, features) matrix the head reads)")
    raise ValueError(f"target {target!r} is a {type(module).__name__}, not an nn.Linear or a "
                     "Sequential of Linear/ReLU/Dropout/BatchNorm1d layers")


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and name.isdigit():
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


def build_head(kind: str, in_features: int, num_classes: int, /,
               **head_kwargs) -> nn.Module:
    """A SpinalHead / ProgressiveHead from a preset name (:data:`PRESETS`) and overrides."""
    if not isinstance(kind, str) or kind not in PRESETS:
        raise ValueError(f"kind must be one of {sorted(PRESETS)}, got {kind!r}")
    preset = dict(PRESETS[kind])
    head_kind = preset.pop("kind")
    for key in ("in_features", "out_features"):
        if key in head_kwargs:
            raise TypeError(f"{key} is set by replace_classifier (from the replaced layer and "
                            "num_classes), not through head keyword arguments")
    cls = SpinalHead if head_kind == "spinal" else ProgressiveHead
    try:
        return cls(in_features, num_classes, **{**preset, **head_kwargs})
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise TypeError(f"{cls.__name__} does not take that argument ({e}); see "
                            f"help(spinalkern.{cls.__name__})") from None
        raise


def replace_classifier(model: nn.Module, kind: str = "spinal", num_classes: int | None = None,
                       *, target: str | None = None, **head_kwargs) -> nn.Module:
    """Replace ``model``'s final classifier with a fused spinal / progressive head, in place.

    Args:
        model: the network, e.g. a torchvision model.  Modified in place and returned.
        kind: "spinal", "progressive", or a preset of :data:`PRESETS` ("spinal-vgg",
            "spinal-wrn", "progressive-wrn").
        num_classes: outputs of the new head; default: those of the replaced layer.
        target: dotted name of the module to replace (``model.get_submodule(target)``): an
            ``nn.Linear``, or a ``Sequential`` of Linear/ReLU/Dropout/BatchNorm1d layers whose
            input the head then reads.  Default: found as listed in this module's doc.
        **head_kwargs: for the head's constructor (``hidden_features``, ``num_layers``,
            ``num_splits``, ``dropout``, ``batch_norm``, ``backend``); they override the preset.

    Returns ``model``.  The head is created on the replaced layer's device, in its dtype.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if num_classes is not None and (isinstance(num_classes, bool)
                                    or not isinstance(num_classes, int)):
        raise TypeError(f"num_classes must be an int or None, got {type(num_classes).__name__}")
    if num_classes is not None and num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if target is None:
        target = find_classifier(model)
    elif not isinstance(target, str) or not target:
        raise TypeError(f"target must be a non-empty str (a dotted module name), got {target!r}")
    old = _get(model, target)
    if old is None:
        raise ValueError(f"target {target!r}: {type(model).__name__} has no such submodule")
    in_features, out_features = _features(old, target)
    head = build_head(kind, in_features, num_classes or out_features, **head_kwargs)
    ref = next(old.parameters(), None)
    if ref is not None:
        head = head.to(device=ref.device, dtype=ref.dtype)
    _set(model, target, head)
    return model
