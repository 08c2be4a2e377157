"""replace_classifier on real torchvision models (random weights: nothing is downloaded)."""
from __future__ import annotations

import gzip
import importlib.util
import math
import os
import struct

import pytest
import torch
import torchvision
from torch import nn

import spinalkern
from spinalkern import ProgressiveHead, SpinalHead, replace_classifier
from spinalkern.transfer import PRESETS, find_classifier

from conftest import requires_cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tv = torchvision.models


def _tiny_vit(num_classes=1000):
    return tv.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                hidden_dim=64, mlp_dim=128, num_classes=num_classes)


def _small_convnext():
    cfg = tv.convnext.CNBlockConfig
    return tv.ConvNeXt([cfg(32, 64, 1), cfg(64, None, 1)])


# (constructor, where the classifier Linear is, input size).  Each model is torchvision's own
# class with random weights; ResNeXt and Wide-ResNet are torchvision's ResNet with their block
# parameters (groups 32 x width 4; width 128) and one block per stage, to keep the test fast.
MODELS = {
    "resnet18": (lambda: tv.resnet18(), "fc", 32),
    "resnext": (lambda: tv.ResNet(tv.resnet.Bottleneck, [1, 1, 1, 1], groups=32,
                                  width_per_group=4), "fc", 32),
    "wide_resnet": (lambda: tv.ResNet(tv.resnet.Bottleneck, [1, 1, 1, 1], width_per_group=128),
                    "fc", 32),
    "vgg11_bn": (lambda: tv.vgg11_bn(), "classifier.6", 32),
    "alexnet": (lambda: tv.alexnet(), "classifier.6", 64),
    "mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(), "classifier.3", 32),
    "efficientnet_b0": (lambda: tv.efficientnet_b0(), "classifier.1", 32),
    "densenet121": (lambda: tv.densenet121(), "classifier", 32),
    "convnext": (lambda: _small_convnext(), "classifier.2", 32),
    "vit": (_tiny_vit, "heads.head", 32),
}


def _linear_input_and_output(model, path, x):
    """Run ``model`` and capture what the module at ``path`` receives and returns."""
    seen = {}
    module = model.get_submodule(path)
    h = module.register_forward_hook(lambda m, inp, out: seen.update(inp=inp[0], out=out))
    try:
        y = model(x)
    finally:
        h.remove()
    return y, seen["inp"], seen["out"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_replace_classifier_on_torchvision_models(name):
    torch.manual_seed(0)
    make, path, size = MODELS[name]
    model = make().eval()
    old = model.get_submodule(path)
    assert isinstance(old, nn.Linear)
    assert find_classifier(model) == path
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        _, feats, _ = _linear_input_and_output(model, path, x)

    assert replace_classifier(model, "spinal", num_classes=7, hidden_features=16) is model
    head = model.get_submodule(path)
    assert isinstance(head, SpinalHead)
    assert (head.spec.D, head.spec.C, head.spec.H) == (old.in_features, 7, 16)
    # the head reads exactly what the Linear read and its output is the model's output
    with torch.no_grad():
        y, feats2, out = _linear_input_and_output(model, path, x)
    assert y.shape == (2, 7)
    assert torch.equal(feats2, feats)
    assert torch.equal(y, out)
    # fine-tuning reaches the backbone and the head
    model.train()
    model(torch.randn(4, 3, size, size)).square().mean().backward()
    assert head.layers[0].weight.grad is not None and head.out.weight.grad.abs().sum() > 0
    first = next(p for p in model.parameters() if p.requires_grad)
    assert first.grad is not None


def test_default_num_classes_progressive_and_dtype():
    model = tv.resnet18().double()
    replace_classifier(model, "progressive", hidden_features=32, num_layers=2)
    assert isinstance(model.fc, ProgressiveHead)
    assert model.fc.spec.C == 1000 and model.fc.spec.D == 512  # the old Linear's
    assert all(p.dtype == torch.float64 for p in model.fc.parameters())
    assert model.eval()(torch.randn(2, 3, 32, 32, dtype=torch.float64)).shape == (2, 1000)


def test_named_target_and_whole_classifier_preset():
    model = tv.vgg11_bn()
    # the SpinalNet paper's VGG placement: the whole classifier, from the 25088 features
    replace_classifier(model, "spinal-vgg", num_classes=10, target="classifier")
    head = model.classifier
    assert isinstance(head, SpinalHead)
    assert (head.spec.D, head.spec.H, head.spec.n, head.spec.num_splits) == (25088, 1024, 4, 2)
    assert head.norms is not None and head.dropout == 0.5
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # a user-named Linear inside a custom model
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    replace_classifier(net, "spinal-wrn", target="3")
    assert isinstance(net[3], SpinalHead) and net[3].spec.D == 8 and net[3].spec.H == 20
    assert net.eval()(torch.randn(5, 3, 4)).shape == (5, 3)


def test_presets_build_the_heads_they_describe():
    for name, preset in PRESETS.items():
        head = spinalkern.transfer.build_head(name, 64, 5)
        kind = preset["kind"]
        assert isinstance(head, SpinalHead if kind == "spinal" else ProgressiveHead)
        for key, value in preset.items():
            if key in ("hidden_features", "num_layers", "num_splits"):
                attr = {"hidden_features": "H", "num_layers": "n", "num_splits": "num_splits"}
                assert getattr(head.spec, attr[key]) == value, (name, key)
            if key == "dropout":
                assert head.dropout == value
            if key == "batch_norm":
                assert (head.norms is not None) == value
    # the caller's keyword arguments override the preset
    head = spinalkern.transfer.build_head("spinal-vgg", 64, 5, hidden_features=8, dropout=0.1)
    assert head.spec.H == 8 and head.dropout == 0.1 and head.norms is not None


def test_clear_errors():
    with pytest.raises(ValueError, match="target="):
        replace_classifier(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ValueError, match="target="):
        replace_classifier(tv.squeezenet1_0())  # its classifier is a convolution
    with pytest.raises(ValueError, match="LayerNorm2d"):  # not a plain MLP classifier
        replace_classifier(_small_convnext(), target="classifier")
    model = tv.resnet18()
    with pytest.raises(ValueError, match="no such submodule"):
        replace_classifier(model, target="head")
    with pytest.raises(ValueError, match="not an nn.Linear"):
        replace_classifier(model, target="avgpool")
    with pytest.raises(ValueError, match="BasicBlock"):
        replace_classifier(model, target="layer4")
    with pytest.raises(ValueError, match="num_classes must be positive"):
        replace_classifier(model, num_classes=0)
    with pytest.raises(TypeError, match="num_classes"):
        replace_classifier(model, num_classes=2.5)
    with pytest.raises(ValueError, match="kind must be one of"):
        replace_classifier(model, "mlp")
    with pytest.raises(TypeError, match="in_features is set by replace_classifier"):
        replace_classifier(model, in_features=3)
    with pytest.raises(TypeError, match="ProgressiveHead does not take"):
        replace_classifier(model, "progressive", batch_norm=True)
    with pytest.raises(ValueError, match="divisible by num_splits"):
        replace_classifier(model, num_splits=3)  # 512 features in 3 segments
    with pytest.raises(TypeError, match="model must be"):
        replace_classifier("resnet18")
    assert isinstance(model.fc, nn.Linear)  # nothing was changed by the failed calls


@requires_cuda
def test_replace_classifier_keeps_the_device():
    model = tv.resnet18().cuda()
    replace_classifier(model, num_classes=10)
    assert model.fc.out.weight.device.type == "cuda"
    assert model(torch.randn(2, 3, 32, 32, device="cuda")).shape == (2, 10)


# ---------------------------------------------------------------------------------------------
# The example: ResNet-18 + fused spinal head on MNIST replicated to 3 channels
# ---------------------------------------------------------------------------------------------
def _write_idx(path, array: torch.Tensor):
    data = struct.pack(">HBB", 0, 0x08, array.dim())
    data += struct.pack(f">{array.dim()}I", *array.shape) + array.numpy().tobytes()
    with gzip.open(path, "wb") as f:
        f.write(data)


def test_example_runs_from_random_init_and_from_a_weights_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 48), ("t10k", 16)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
                   torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz",
                   torch.randint(0, 10, (n,), dtype=torch.uint8, generator=g))
    weights = tmp_path / "resnet18.pth"
    torch.save(tv.resnet18().state_dict(), weights)
    spec = importlib.util.spec_from_file_location(
        "transfer_example", os.path.join(ROOT, "examples", "transfer_resnet18_mnist.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = ["--data-root", str(tmp_path), "--epochs", "1", "--batch-size", "16",
            "--device", "cpu", "--backend", "torch"]
    for extra in ([], ["--weights", str(weights)]):
        result = example.main(args + extra)
        assert 0.0 <= result["test_accuracy"] <= 100.0 and result["images"] == 48
        assert math.isfinite(result["train_loss"])
    # the weights file is really loaded: the backbone equals the saved one
    model = example.build_model(str(weights), "torch", "cpu")
    saved = torch.load(weights, weights_only=True)
    assert torch.equal(model.conv1.weight, saved["conv1.weight"])
    assert isinstance(model.fc, SpinalHead) and model.fc.spec.C == 10
    with pytest.raises(FileNotFoundError, match="downloads nothing"):
        example.main(["--data-root", str(tmp_path / "none")])
