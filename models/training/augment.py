"""Per-sample data augmentation on the device, as one batched resampling.

Every sample of a batch gets its own random geometric transform: a rotation, a perspective
warp, a random crop of the zero-padded image and an optional horizontal flip, the same kinds
and ranges as torchvision's ``RandomRotation(10)``, ``RandomPerspective(0.5, p=0.5)``,
``RandomCrop(28, padding=2)`` and ``RandomHorizontalFlip(p)`` used by the papers' scripts.
All of them are 3x3 projective maps, so they multiply into one matrix per sample; a single
``grid_sample`` call then resamples the whole batch.  Only tensor operations on the batch's
device are used (no host synchronisation, no linear solves), so the whole augmentation can sit
inside a captured CUDA graph: the random numbers come from torch's device generator, which
draws new values on every graph replay.

Pixels are resampled bilinearly with zero fill (black, as torchvision's default ``fill=0``)
and then normalised with the data set's mean and standard deviation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """Ranges of the random transforms; zero / ``False`` switches one off."""
    rotation: float = 10.0        # degrees, uniform in [-rotation, rotation]
    perspective: float = 0.5      # distortion scale (fraction of the half size a corner moves)
    perspective_p: float = 0.5    # probability that a sample gets a perspective warp
    crop_padding: int = 2         # random crop of the image padded by this many pixels
    hflip_p: float = 0.0          # probability of a horizontal flip

    @property
    def enabled(self) -> bool:
        return bool(self.rotation or (self.perspective and self.perspective_p)
                    or self.crop_padding or self.hflip_p)

    def validate(self) -> "AugmentConfig":
        if not 0.0 <= self.rotation <= 180.0:
            raise ValueError(f"rotation must be in [0, 180] degrees, got {self.rotation}")
        if not 0.0 <= self.perspective < 1.0:
            raise ValueError(f"perspective distortion must be in [0, 1), got {self.perspective}")
        for name in ("perspective_p", "hflip_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        if self.crop_padding < 0:
            raise ValueError(f"crop padding must be >= 0, got {self.crop_padding}")
        return self


NO_AUGMENT = AugmentConfig(rotation=0.0, perspective=0.0, perspective_p=0.0, crop_padding=0,
                           hflip_p=0.0)


def _uniform(b: int, lo, hi, device) -> torch.Tensor:
    return torch.rand(b, device=device) * (hi - lo) + lo


def _eye(b: int, device) -> torch.Tensor:
    return torch.eye(3, device=device).expand(b, 3, 3).clone()


def _square_to_quad(q: torch.Tensor) -> torch.Tensor:
    """Projective maps taking the unit square's corners (0,0),(1,0),(1,1),(0,1) to the four
    corners ``q`` (B, 4, 2), in closed form (Heckbert, "Fundamentals of Texture Mapping", 1989).
    """
    x0, x1, x2, x3 = q[:, 0, 0], q[:, 1, 0], q[:, 2, 0], q[:, 3, 0]
    y0, y1, y2, y3 = q[:, 0, 1], q[:, 1, 1], q[:, 2, 1], q[:, 3, 1]
    dx1, dx2, dx3 = x1 - x2, x3 - x2, x0 - x1 + x2 - x3
    dy1, dy2, dy3 = y1 - y2, y3 - y2, y0 - y1 + y2 - y3
    den = dx1 * dy2 - dx2 * dy1
    g = (dx3 * dy2 - dx2 * dy3) / den
    h = (dx1 * dy3 - dx3 * dy1) / den
    one = torch.ones_like(g)
    rows = [x1 - x0 + g * x1, x3 - x0 + h * x3, x0,
            y1 - y0 + g * y1, y3 - y0 + h * y3, y0,
            g, h, one]
    return torch.stack(rows, dim=1).view(-1, 3, 3)


def _adjugate(m: torch.Tensor) -> torch.Tensor:
    """Adjugate of a batch of 3x3 matrices: the inverse up to a scale, which a projective
    map does not care about (and no division that could be a zero determinant)."""
    a, b, c = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    d, e, f = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    g, h, i = m[:, 2, 0], m[:, 2, 1], m[:, 2, 2]
    rows = [e * i - f * h, c * h - b * i, b * f - c * e,
            f * g - d * i, a * i - c * g, c * d - a * f,
            d * h - e * g, b * g - a * h, a * e - b * d]
    return torch.stack(rows, dim=1).view(-1, 3, 3)


class _Constants:
    """Fixed tensors for one image size on one device, made once (before any graph capture:
    creating a tensor from Python numbers copies from the host, which a capture forbids)."""

    def __init__(self, height: int, width: int, device):
        h, w = height, width
        hw, hh = (w - 1) / 2.0, (h - 1) / 2.0
        # Image corners in centred pixel coordinates, and the directions towards the centre.
        self.corners = torch.tensor([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]], device=device)
        self.inward = -torch.sign(self.corners)
        self.half = torch.tensor([w / 2.0, h / 2.0], device=device)
        # grid_sample's normalised coordinates (align_corners=False) relate to centred pixel
        # coordinates by u_pixel = u_norm * W / 2 (and likewise for rows).
        self.to_pix = torch.diag(torch.tensor([w / 2.0, h / 2.0, 1.0], device=device))
        self.to_norm = torch.diag(torch.tensor([2.0 / w, 2.0 / h, 1.0], device=device))
        ys = (torch.arange(h, device=device, dtype=torch.float32) * 2 + 1) / h - 1
        xs = (torch.arange(w, device=device, dtype=torch.float32) * 2 + 1) / w - 1
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        self.base = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).view(1, h * w, 3)


_CONSTANTS: dict = {}


def _constants(height: int, width: int, device) -> _Constants:
    key = (height, width, str(torch.device(device)))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = _Constants(height, width, device)
    return _CONSTANTS[key]


def random_matrices(cfg: AugmentConfig, b: int, height: int, width: int, device) -> torch.Tensor:
    """(B, 3, 3) maps from *output* to *input* pixel coordinates (origin at the image
    centre, one unit per pixel) composing the random transforms of ``cfg``.

    The image transforms are applied in the order rotation, perspective, crop, flip, so the
    output-to-input map is the product of their inverses in that same order.
    """
    c = _constants(height, width, device)
    m = _eye(b, device)
    if cfg.rotation:
        # A rotation by a uniform angle in [-r, r]; its inverse has the same distribution.
        ang = _uniform(b, -cfg.rotation, cfg.rotation, device) * (math.pi / 180.0)
        cos, sin = torch.cos(ang), torch.sin(ang)
        rot = _eye(b, device)
        rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = cos, -sin, sin, cos
        m = m @ rot
    if cfg.perspective and cfg.perspective_p:
        # Each image corner moves inwards by up to distortion * half size (torchvision's
        # RandomPerspective); the output-to-input map takes the moved corners back.
        apply = (torch.rand(b, 1, 1, device=device) < cfg.perspective_p).float()
        step = torch.rand(b, 4, 2, device=device) * (c.half * cfg.perspective) * apply
        end = c.corners + c.inward * step
        to_start = _square_to_quad(c.corners.expand(b, 4, 2))
        persp = to_start @ _adjugate(_square_to_quad(end))
        m = m @ (persp / persp[:, 2:3, 2:3])
    if cfg.crop_padding:
        # Cropping the padded image at a random offset shifts the content by a whole number
        # of pixels in [-p, p] in each direction.
        p = cfg.crop_padding
        shift = torch.randint(-p, p + 1, (b, 2), device=device).float()
        crop = _eye(b, device)
        crop[:, 0, 2], crop[:, 1, 2] = shift[:, 0], shift[:, 1]
        m = m @ crop
    if cfg.hflip_p:
        flip = _eye(b, device)
        flip[:, 0, 0] = torch.where(torch.rand(b, device=device) < cfg.hflip_p, -1.0, 1.0)
        m = m @ flip
    return m


def warp(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Resample float ``images`` (B, C, H, W) with per-sample output-to-input pixel maps."""
    b, _, h, w = images.shape
    c = _constants(h, w, images.device)
    m = c.to_norm @ matrices.to(torch.float32) @ c.to_pix
    pts = c.base @ m.transpose(1, 2)                       # (B, H*W, 3)
    grid = (pts[..., :2] / pts[..., 2:3]).view(b, h, w, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class GPUAugment(torch.nn.Module):
    """uint8 images (B, C, H, W) -> augmented, normalised float32 images, on their device.

    With augmentation disabled (or in ``eval()`` mode) it only converts and normalises,
    ``(x / 255 - mean) / std``; the geometry is then untouched.
    """

    def __init__(self, cfg: AugmentConfig | None = None, mean: float = 0.0, std: float = 1.0,
                 channels_last: bool = False):
        super().__init__()
        self.cfg = (cfg or AugmentConfig()).validate()
        if std <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.mean, self.std = float(mean), float(std)
        self.channels_last = channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 images (B, C, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        x = images.float()
        if self.training and self.cfg.enabled:
            b, _, h, w = x.shape
            x = warp(x, random_matrices(self.cfg, b, h, w, x.device))
        x = (x * (1.0 / 255.0) - self.mean) * (1.0 / self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
