"""Per-sample augmentation on the device: ranges, exactness, randomness, CUDA graphs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.training.augment import NO_AUGMENT, AugmentConfig, GPUAugment, random_matrices, warp


def _images(n, h=28, w=28, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)


def _batch(b=16, seed=0):
    return torch.from_numpy(_images(b, seed=seed)).unsqueeze(1)


def test_augment_shape_dtype_and_normalisation():
    x = _batch()
    aug = GPUAugment(AugmentConfig(hflip_p=0.5), mean=0.1, std=0.3)
    y = aug(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    ref = (x.float() / 255.0 - 0.1) / 0.3
    off = GPUAugment(NO_AUGMENT, mean=0.1, std=0.3)(x)
    assert torch.allclose(off, ref, atol=1e-5)
    aug.eval()
    assert torch.allclose(aug(x), ref, atol=1e-5)   # evaluation never augments
    with pytest.raises(ValueError):
        aug(x.float())


def test_augment_random_per_sample_and_seeded():
    x = _batch(1).expand(32, 1, 28, 28).contiguous()
    aug = GPUAugment(AugmentConfig())
    torch.manual_seed(0)
    y = aug(x)
    diffs = [(y[i] - y[0]).abs().max().item() for i in range(1, 32)]
    assert min(diffs) > 0                    # every sample got its own transform
    torch.manual_seed(0)
    assert torch.equal(aug(x), y)            # reproducible from the seed


def test_identity_warp_is_exact_enough():
    x = _batch().float()
    y = warp(x, torch.eye(3).expand(16, 3, 3))
    assert (y - x).abs().max() < 1e-2


def test_crop_is_an_integer_shift_with_zero_fill():
    x = _batch().float()
    torch.manual_seed(1)
    m = random_matrices(AugmentConfig(rotation=0, perspective=0, crop_padding=2), 16, 28, 28, "cpu")
    y = warp(x, m)
    for i in range(16):
        tx, ty = int(m[i, 0, 2]), int(m[i, 1, 2])
        assert -2 <= tx <= 2 and -2 <= ty <= 2
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        ref = padded[:, 2 + ty:2 + ty + 28, 2 + tx:2 + tx + 28]
        assert (y[i] - ref).abs().max() < 1e-2


def test_flip_and_rotation():
    x = _batch().float()
    torch.manual_seed(2)
    y = warp(x, random_matrices(AugmentConfig(rotation=0, perspective=0, crop_padding=0,
                                              hflip_p=0.5), 16, 28, 28, "cpu"))
    flipped = [(y[i] - x[i].flip(-1)).abs().max() < 1e-2 for i in range(16)]
    same = [(y[i] - x[i]).abs().max() < 1e-2 for i in range(16)]
    assert all(a or b for a, b in zip(flipped, same)) and any(flipped) and any(same)
    # a centred blob keeps its centre of mass under rotation
    blob = torch.zeros(1, 1, 28, 28)
    blob[..., 10:18, 10:18] = 255.0
    r = warp(blob.expand(8, 1, 28, 28), random_matrices(
        AugmentConfig(rotation=10, perspective=0, crop_padding=0), 8, 28, 28, "cpu"))
    assert torch.allclose(r.sum(dim=(1, 2, 3)), blob.sum().expand(8), rtol=0.05)


def test_perspective_only_changes_some_samples():
    torch.manual_seed(3)
    m = random_matrices(AugmentConfig(rotation=0, perspective=0.5, perspective_p=0.5,
                                      crop_padding=0), 64, 28, 28, "cpu")
    ident = [torch.allclose(m[i], torch.eye(3), atol=1e-5) for i in range(64)]
    assert 10 < sum(ident) < 54          # about half the samples are warped
    assert torch.isfinite(m).all()


def test_augment_config_validation():
    with pytest.raises(ValueError):
        AugmentConfig(perspective=1.5).validate()
    with pytest.raises(ValueError):
        AugmentConfig(hflip_p=2).validate()
    assert not NO_AUGMENT.enabled and AugmentConfig().enabled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_in_cuda_graph_draws_new_randomness_per_replay():
    x = _batch(64).cuda()
    aug = GPUAugment(AugmentConfig(hflip_p=0.5), mean=0.13, std=0.31).cuda()
    static_out = aug(x)                              # eager warm-up creates the constants
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        aug(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = aug(x)
    g.replay()
    first = static_out.clone()
    g.replay()
    assert not torch.equal(first, static_out)
    assert static_out.shape == x.shape and torch.isfinite(static_out).all()
