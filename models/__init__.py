"""Models and training for the spinalkern heads.

>>> import models
>>> net = models.build("spinal-vgg5", num_classes=10, backend="torch")
>>> models.count_params(net)
3629770

Model names are the presets in :data:`models.PRESETS` (``cnn``, ``spinal-cnn-8``,
``spinal-cnn-10``, ``vgg5``, ``spinal-vgg5``, ``progressive-vgg5``, ``resnet18-fc``,
``resnet18-fc512``, ``spinal-resnet18``, ``progressive-resnet18``, ...) or any
``<backbone>-<head>`` combination (backbones ``cnn``, ``vgg5``, ``resnet18``, ``rescnn``;
heads ``fc``, ``fc<N>``, ``spinal``, ``progressive``).  Training: ``python -m models.train``.
"""
from .heads import HeadConfig
from .registry import PRESETS, Classifier, build, count_params, head_config, resolve
from .backbones import BACKBONES


def list_models() -> list[str]:
    """Preset names plus every <backbone>-<head> combination with the default heads."""
    names = list(PRESETS)
    for b in BACKBONES:
        for h in ("fc", "fc512", "spinal", "progressive"):
            if f"{b}-{h}" not in names:
                names.append(f"{b}-{h}")
    return names


__all__ = ["build", "count_params", "list_models", "resolve", "head_config", "PRESETS",
           "BACKBONES", "Classifier", "HeadConfig"]
