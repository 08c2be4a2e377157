"""Transfer learning with a fused spinal head: torchvision ResNet-18 on MNIST.

The digits are replicated to 3 channels (ResNet-18 expects RGB) and ResNet-18's ``fc`` is
replaced by a SpinalHead in one line.  The backbone starts from random weights, or from a
weights file you give (e.g. ImageNet weights you saved with ``torch.save(model.state_dict())``):
nothing is downloaded.

    python examples/transfer_resnet18_mnist.py --data-root DIR [--weights resnet18.pth]
        [--epochs 1] [--limit 2048] [--device cuda] [--backend auto]

DIR holds MNIST's four IDX files (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``; gzipped or not), directly or in
torchvision's layout ``DIR/MNIST/raw/``.  Needs spinalkern and torchvision.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
import time

import torch
import torchvision
from torch import nn

import spinalkern

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(root: str, name: str) -> torch.Tensor:
    """One IDX file (MNIST's format: magic 0x0000 08 NDIM, big-endian sizes, uint8 data)."""
    for folder in (root, os.path.join(root, "MNIST", "raw")):
        for fname in (name + ".gz", name):
            path = os.path.join(folder, fname)
            if os.path.exists(path):
                opener = gzip.open if fname.endswith(".gz") else open
                with opener(path, "rb") as f:
                    data = f.read()
                zero, dtype, ndim = struct.unpack(">HBB", data[:4])
                if zero != 0 or dtype != 0x08:
                    raise ValueError(f"{path}: not a uint8 IDX file")
                shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
                flat = torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8)
                return flat.reshape(shape)
    raise FileNotFoundError(f"{name}[.gz] not found in {root} or {root}/MNIST/raw; put MNIST's "
                            "IDX files there (this example downloads nothing)")


def load_split(root: str, split: str, limit: int | None):
    images, labels = (read_idx(root, f) for f in FILES[split])
    if limit:
        images, labels = images[:limit], labels[:limit]
    x = images.float().div_(255).sub_(0.1307).div_(0.3081)  # MNIST's mean / std
    return x[:, None].expand(-1, 3, -1, -1).contiguous(), labels.long()  # 1 -> 3 channels


def build_model(weights: str | None, backend: str, device) -> nn.Module:
    model = torchvision.models.resnet18(weights=None)
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    # The one line: ResNet-18's fc (512 -> 1000) becomes a fused spinal head (512 -> 10).
    spinalkern.replace_classifier(model, "spinal", num_classes=10, hidden_features=128,
                                  num_layers=4, num_splits=2, dropout=0.2, backend=backend)
    return model.to(device)


@torch.no_grad()
def evaluate(model, x, y, batch_size, device) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size].to(device))
        correct += (out.argmax(1).cpu() == y[i:i + batch_size]).sum().item()
    return 100.0 * correct / len(x)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", required=True, help="folder with MNIST's IDX files")
    p.add_argument("--weights", default=None, help="ResNet-18 state dict to start from "
                   "(default: random initialisation)")
    p.add_argument("--epochs", type=int, default=1, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=128, help="default: %(default)s")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images of each "
                   "split (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when available, else cpu")
    p.add_argument("--backend", default="auto", choices=spinalkern.backend_names(),
                   help="spinal head backend (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 2 or (args.limit is not None and args.limit < 2):
        p.error("--epochs must be >= 1, --batch-size and --limit >= 2")

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    x_train, y_train = load_split(args.data_root, "train", args.limit)
    x_test, y_test = load_split(args.data_root, "test", args.limit)
    model = build_model(args.weights, args.backend, device)
    print(f"head: {model.fc}")
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train))
        total = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples per batch in training mode
                continue
            loss = loss_fn(model(x_train[idx].to(device)), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        acc = evaluate(model, x_test, y_test, 4 * args.batch_size, device)
        print(f"epoch {epoch + 1}: train loss {total / len(x_train):.4f}, "
              f"test accuracy {acc:.2f} %")
    result = {"test_accuracy": acc, "train_loss": total / len(x_train),
              "seconds": round(time.perf_counter() - start, 1), "images": len(x_train)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
