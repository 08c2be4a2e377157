"""The papers' training-loop style, as the baseline for training throughput.

    python -m bench.paper_loop --model spinal-vgg5 --data mnist --data-root data \
        --epochs 1 --train-subset 10000 --device cuda --out DIR

What the SpinalNet / ProgressiveSpinalNet scripts do, written plainly: a torch DataLoader
(batch 100, shuffled, ``num_workers`` 0 as in those scripts unless ``--workers`` is given)
over the IDX images, per-image CPU augmentation with torchvision.transforms.v2 on tensors
(RandomPerspective, RandomRotation(10), then scaling to [0, 1] and Normalize), fp32 eager
model (``models.build``), Adam, CrossEntropyLoss, and a test pass after every epoch.  No
torchvision data sets are used: the IDX files are read by ``models.training.datasets``.

Writes ``DIR/summary.json`` with the keys the training CLI writes (``images_per_s``,
``epoch_times_s``, ``test_accuracy`` in percent, ``params``, ``epochs``,
``peak_gpu_memory_bytes``), so that
bench.train_throughput reads both the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.utils.data import DataLoader, Dataset

from . import benchlib as common


class IdxImages(Dataset):
    """uint8 images (N, 1, H, W) and int64 labels; ``transform`` runs per image on CPU."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def make_transforms(mean: float, std: float, augment: bool):
    from torchvision.transforms import v2
    steps = [v2.RandomPerspective(), v2.RandomRotation(10)] if augment else []
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize((mean,), (std,))]
    return v2.Compose(steps)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="the papers' training-loop style (baseline)")
    p.add_argument("--model", default="spinal-vgg5")
    p.add_argument("--data", default="mnist")
    p.add_argument("--data-root", default="data")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (papers: 0)")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--backend", default="torch", help="head backend (papers: plain torch)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the data files' checksums (synthetic test data)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True)
    opts = p.parse_args(argv)

    import models
    from models.training.datasets import load_dataset, pixel_stats, subset_indices
    device = torch.device(opts.device)
    raw = load_dataset(opts.data, opts.data_root, verify=opts.verify)
    tr = subset_indices(raw.train_images.shape[0], opts.train_subset)
    te = subset_indices(raw.test_images.shape[0], opts.test_subset, seed=1)
    mean, std = pixel_stats(raw.train_images[tr])
    train_set = IdxImages(raw.train_images[tr], raw.train_labels[tr],
                          make_transforms(mean, std, augment=True))
    test_set = IdxImages(raw.test_images[te], raw.test_labels[te],
                         make_transforms(mean, std, augment=False))
    train_loader = DataLoader(train_set, batch_size=opts.batch_size, shuffle=True,
                              num_workers=opts.workers)
    test_loader = DataLoader(test_set, batch_size=opts.batch_size, shuffle=False,
                             num_workers=opts.workers)

    torch.manual_seed(0)
    model = models.build(opts.model, num_classes=raw.num_classes, backend=opts.backend)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)
    criterion = torch.nn.CrossEntropyLoss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    epoch_times, accuracy = [], None
    for epoch in range(opts.epochs):
        model.train()
        t0 = time.perf_counter()
        for i, (images, labels) in enumerate(train_loader):
            images, labels = images.to(device), labels.to(device)
            loss = criterion(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if (i + 1) % 100 == 0:  # the scripts print the loss now and then (a host sync)
                print(f"epoch {epoch + 1} step {i + 1} loss {loss.item():.4f}", flush=True)
        common.synchronize(device)
        epoch_times.append(time.perf_counter() - t0)

        model.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in test_loader:
                images, labels = images.to(device), labels.to(device)
                predicted = model(images).argmax(1)
                total += labels.size(0)
                correct += (predicted == labels).sum().item()
        accuracy = 100.0 * correct / max(total, 1)  # percent, as models.train reports it
        print(f"epoch {epoch + 1}: {epoch_times[-1]:.2f} s, test accuracy {accuracy:.2f}%",
              flush=True)

    n = len(train_set)
    # As models.train: images_per_s over all epochs, and the median after the first epoch.
    steady = sorted(epoch_times[1:])[len(epoch_times[1:]) // 2] if len(epoch_times) > 1 else None
    summary = {
        "model": opts.model, "data": opts.data, "paper_loop": True,
        "batch_size": opts.batch_size, "workers": opts.workers, "amp": "none",
        "cuda_graph": False, "compile": False, "backend": opts.backend,
        "epochs": opts.epochs, "train_samples": n,
        "epoch_times_s": [round(t, 3) for t in epoch_times],
        "images_per_s": n * len(epoch_times) / sum(epoch_times),
        "images_per_s_after_first_epoch": n / steady if steady else None,
        "test_accuracy": accuracy,
        "params": models.count_params(model),
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda" else None,
        "device": str(device),
    }
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: summary[k] for k in ("images_per_s", "test_accuracy")}))
    return summary


if __name__ == "__main__":
    main()
