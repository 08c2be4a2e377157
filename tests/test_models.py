"""Model construction, parameter counts against the papers, and forward/backward passes."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import models
from models import params as P
from models.heads import FCHead, MLPHead

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Exact counts; the papers print them rounded (SpinalNet Table II; Spinal-ResNet18 Table 1).
PAPER = [
    ("cnn", 10, 21_840, "21.84k"),
    ("spinal-cnn-8", 10, 13_818, "13.82k"),
    ("spinal-cnn-10", 10, 16_050, "16.05k"),
    ("vgg5", 10, 3_646_154, "3.646M"),
    ("spinal-vgg5", 10, 3_629_770, "3.630M"),
    ("resnet18-fc512", 26, 11_443_674, "11.44M"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small CPU workloads: one thread is as fast and immune to oversubscribed machines."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def table_rows():
    return P.table_rows()


@pytest.mark.parametrize("name,classes,exact,printed", PAPER)
def test_param_counts_match_papers(name, classes, exact, printed):
    n = models.count_params(models.build(name, classes, backend="torch"))
    assert n == exact
    value, unit = printed[:-1], printed[-1]
    decimals = len(value.split(".")[1])
    assert f"{n / {'k': 1e3, 'M': 1e6}[unit]:.{decimals}f}" == value


def test_spinal_resnet18_paper_count_is_not_reproducible():
    """The paper says 11.78M (and '+0.3M over 11.44M'); its own description gives less."""
    s2 = models.count_params(models.build("spinal-resnet18", 26, backend="torch"))
    s4 = models.count_params(models.build("spinal-resnet18-s4h64", 26, backend="torch"))
    base = models.count_params(models.build("resnet18-fc", 26, backend="torch"))
    assert s2 == 11_361_754 and s4 == 11_219_674
    assert base == 11_181_018
    assert round(s2 / 1e6, 2) != 11.78 and round(s4 / 1e6, 2) != 11.78


def test_params_table_rows_and_markdown(table_rows):
    rows = {r["model"]: r for r in table_rows}
    for name, *_ in PAPER:
        assert rows[name]["match"] is True
    assert rows["spinal-resnet18"]["match"] is False
    md = P.markdown(list(rows.values()))
    assert "| `spinal-vgg5` | vgg5 | spinal | 10 | 3,629,770 | 3.630M" in md
    assert "**no**: we get 11.36M" in md


def test_params_check_file(tmp_path, table_rows, monkeypatch):
    table = P.markdown(table_rows)
    f = tmp_path / "README.md"
    f.write_text(f"intro\n{P.BEGIN}\n{table}\n{P.END}\nrest\n")
    assert P.check_file(str(f), table) is None
    f.write_text(f"{P.BEGIN}\nold table\n{P.END}\n")
    assert "out of date" in P.check_file(str(f), table)
    monkeypatch.setattr(P, "table_rows", lambda: table_rows)
    assert P.main(["--check", str(f)]) == 1


def test_docs_table_is_current(table_rows):
    doc = os.path.join(REPO, "docs", "training.md")
    assert P.check_file(doc, P.markdown(table_rows)) is None


def test_head_structures():
    vgg = models.build("vgg5", 10)
    assert isinstance(vgg.head, MLPHead)
    kinds = [type(m) for m in vgg.head]
    assert kinds == [nn.Dropout, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear]
    assert vgg.head[0].p == 0.5 and vgg.head[1].out_features == 512
    cnn = models.build("cnn", 10)
    assert [type(m) for m in cnn.head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert cnn.head[0].out_features == 50
    sp = models.build("spinal-cnn-10", 10, backend="torch").head
    assert len(sp.layers) == 6 and sp.layers[0].weight.shape == (10, 160)
    assert sp.layers[1].weight.shape == (10, 170) and sp.out.weight.shape == (10, 60)
    sv = models.build("spinal-vgg5", 10, backend="torch").head
    assert sv.norms is not None and sv.dropout == 0.5
    assert sv.layers[0].weight.shape == (128, 128) and sv.layers[1].weight.shape == (128, 256)
    pv = models.build("progressive-vgg5", 10, backend="torch").head
    assert pv.dropout == 0.2 and pv.layers[3].weight.shape == (128, 256 + 3 * 128)
    assert pv.out.weight.shape == (10, 256 + 4 * 128)
    sr = models.build("spinal-resnet18", 26, backend="torch").head
    assert sr.layers[0].weight.shape == (128, 256) and sr.out.weight.shape == (26, 512)
    assert isinstance(models.build("resnet18-fc", 26).head, FCHead)


def test_resnet18_stem_has_one_channel_and_no_maxpool():
    net = models.build("resnet18-fc", 26).backbone.net
    assert net.conv1.weight.shape == (64, 1, 3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)


@pytest.mark.parametrize("backbone", ["cnn", "vgg5", "resnet18", "rescnn"])
@pytest.mark.parametrize("head", ["fc", "fc512", "spinal", "progressive"])
def test_every_head_on_every_backbone(backbone, head):
    torch.manual_seed(0)
    net = models.build(f"{backbone}-{head}", 7, backend="torch")
    x = torch.randn(2, 1, 28, 28)
    y = net(x)
    assert y.shape == (2, 7) and torch.isfinite(y).all()
    y.sum().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads)
    net.eval()
    with torch.no_grad():
        assert net(x[:1]).shape == (1, 7)


def test_overrides_and_names():
    net = models.build("vgg5-spinal", 10, backend="torch", hidden=32, layers=3, dropout=0.0,
                       batch_norm=False)
    assert len(net.head.layers) == 3 and net.head.layers[0].weight.shape == (32, 128)
    assert "spinal-resnet18" in models.list_models() and "rescnn-fc512" in models.list_models()
    net = models.build("cnn-fc64", 3)
    assert net.head[0].out_features == 64


@pytest.mark.parametrize("call,match", [
    (lambda: models.build("alexnet", 10), "unknown model"),
    (lambda: models.build("vgg5-foo", 10), "unknown head"),
    (lambda: models.build("vgg5", 0), "num_classes"),
    (lambda: models.build("spinal-vgg5", 10, splits=3), "cannot be split"),
    (lambda: models.build("spinal-vgg5", 10, hidden=0), "hidden width"),
    (lambda: models.build("spinal-vgg5", 10, layers=0), ">= 1 layer"),
    (lambda: models.build("vgg5", 10, dropout=1.5), "dropout"),
    (lambda: models.build("spinal-vgg5", 10, backend="opencl"), "unknown backend"),
    (lambda: models.build("vgg5", 10, colour="red"), "unknown head option"),
])
def test_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["spinal-vgg5", "progressive-resnet18", "spinal-cnn-8"])
@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_cuda_forward_backward_bf16_channels_last(name, backend):
    torch.manual_seed(0)
    net = models.build(name, 10, backend=backend).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(64, 1, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = net(x)
    assert y.shape == (64, 10) and torch.isfinite(y.float()).all()
    y.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
