"""Subsets, cross-validation folds and the copy of a data set kept whole on the device."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .read import RawDataset


@dataclass
class DeviceData:
    """A data set split into train and eval parts, kept whole on the device as uint8.

    ``eval_*`` is the test set, or the held-out fold in cross-validation mode.  ``mean`` and
    ``std`` are the pixel statistics of the training part (in [0, 1] units) used to normalise.
    """
    name: str
    num_classes: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    mean: float
    std: float
    test_x: torch.Tensor | None = None  # the real test set when eval_* is a CV fold
    test_y: torch.Tensor | None = None


def subset_indices(n: int, size: int | None, seed: int = 0, what: str = "subset") -> torch.Tensor:
    """A fixed pseudo-random subset of ``range(n)`` (the first ``size`` of a seeded permutation)."""
    if size is None:
        return torch.arange(n)
    if size <= 0 or size > n:
        raise ValueError(f"{what} {size} is impossible: the set has {n} samples")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:size].sort().values


def fold_indices(n: int, folds: int, fold: int, seed: int = 0):
    """(train, validation) indices of fold ``fold`` of a seeded ``folds``-way split of range(n)."""
    if folds < 2 or folds > n:
        raise ValueError(f"--folds {folds} is impossible for {n} training samples (need 2..{n})")
    if not 0 <= fold < folds:
        raise ValueError(f"fold {fold} out of range 0..{folds - 1}")
    g = torch.Generator().manual_seed(seed + 7919)
    perm = torch.randperm(n, generator=g)
    bounds = [n * k // folds for k in range(folds + 1)]
    val = perm[bounds[fold]:bounds[fold + 1]]
    train = torch.cat([perm[:bounds[fold]], perm[bounds[fold + 1]:]])
    return train.sort().values, val.sort().values


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of uint8 ``images`` in [0, 1] units (from a histogram)."""
    hist = torch.bincount(images.reshape(-1), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    n = max(float(hist.sum()), 1.0)
    mean = float((hist * values).sum()) / n
    var = float((hist * values * values).sum()) / n - mean * mean
    return mean, max(var, 0.0) ** 0.5


def to_device(raw: RawDataset, device, train_subset: int | None = None,
              test_subset: int | None = None, folds: int | None = None,
              fold: int = 0) -> DeviceData:
    """Select the training/eval samples and move them to ``device`` as uint8."""
    device = torch.device(device)
    tr = subset_indices(raw.train_images.shape[0], train_subset, what="--train-subset")
    te = subset_indices(raw.test_images.shape[0], test_subset, seed=1, what="--test-subset")
    train_x, train_y = raw.train_images[tr], raw.train_labels[tr]
    test_x, test_y = raw.test_images[te], raw.test_labels[te]
    extra = {}
    if folds:
        tr_f, va_f = fold_indices(train_x.shape[0], folds, fold)
        eval_x, eval_y = train_x[va_f], train_y[va_f]
        train_x, train_y = train_x[tr_f], train_y[tr_f]
        extra = dict(test_x=test_x.to(device), test_y=test_y.to(device))
    else:
        eval_x, eval_y = test_x, test_y
    mean, std = pixel_stats(train_x)
    return DeviceData(raw.name, raw.num_classes, train_x.to(device), train_y.to(device),
                      eval_x.to(device), eval_y.to(device), mean, max(std, 1e-3), **extra)
