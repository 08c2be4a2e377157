"""The head specification that every backend implements.

A head maps x (B, D) to y (B, C) through ``n`` hidden layers of width ``H`` and one output
layer.  Every layer ``L`` (0..n-1 hidden, ``L == n`` the output layer) is a Linear on an input
row ``u_L`` that is a concatenation of *pieces*; the concatenation is never materialised by the
fused backends, which multiply each piece with the matching column block of ``W_L``.

``u_L`` always has the same two-part layout: first ``x_width(L)`` columns taken from ``x``
(starting at column ``x_offset(L)``), then ``h_width(L)`` columns taken from the hidden
activations ``hidden = [h_0; ...; h_{n-1}]`` (starting at column ``h_offset(L)``).

* sequential SpinalNet (``kind="spinal"``), S splits, ``seg = D / S``, ``S <= n`` (so that
  every segment is read):
  layer L < n reads ``[x segment (L mod S); h_{L-1}]`` (no h for L = 0), the output layer reads
  ``[h_0; ...; h_{n-1}]``.  Dropout (if any) is applied to every layer's whole input ``u_L``
  with an independent mask per layer.
* ProgressiveSpinalNet (``kind="progressive"``): layer 0 reads ``x``; layer L >= 1 reads
  ``[x~; h_0; ...; h_{L-1}]``, the output layer ``[x~; h_0; ...; h_{n-1}]`` with
  ``x~ = drop(x)`` (one mask, shared by all the layers that read it).  Hidden outputs are
  never dropped.

Dropout masks are defined by a counter-based RNG so that every backend, and the float64
reference, draws the *same* mask for the same seed (see :func:`spinalkern.rng.keep_mask`):
element (row r, column c) of the input of "stream" s is kept iff
``philox4x32_10(key=seed, counter=(c, r, s, 0))[0] >= threshold(p)``.
Streams: spinal layer L uses stream L for all of ``u_L`` (column = column in ``u_L``);
progressive uses stream 0 for ``x~`` (column = column of ``x``).
"""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("spinal", "progressive")
SPINAL, PROGRESSIVE = 0, 1  # integer codes used by the ops and kernels


@dataclass(frozen=True)
class HeadSpec:
    kind: str
    in_features: int
    hidden_features: int
    num_layers: int
    out_features: int
    num_splits: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("in_features", "hidden_features", "num_layers", "out_features", "num_splits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if self.kind == "progressive" and self.num_splits != 1:
            raise ValueError("num_splits applies to the spinal head only (progressive reads all of x)")
        if self.num_splits > self.num_layers:
            raise ValueError(
                f"num_splits ({self.num_splits}) must not exceed num_layers "
                f"({self.num_layers}): layer i reads segment i mod num_splits, so "
                f"{self.num_splits - self.num_layers} of the {self.num_splits} segments of x "
                "would never be read")
        if self.in_features % self.num_splits != 0:
            raise ValueError(
                f"in_features ({self.in_features}) must be divisible by num_splits "
                f"({self.num_splits})")

    # -- short names -------------------------------------------------------------------------
    @property
    def kind_code(self) -> int:
        return SPINAL if self.kind == "spinal" else PROGRESSIVE

    @property
    def D(self) -> int:
        return self.in_features

    @property
    def H(self) -> int:
        return self.hidden_features

    @property
    def n(self) -> int:
        return self.num_layers

    @property
    def C(self) -> int:
        return self.out_features

    @property
    def seg(self) -> int:
        return self.in_features // self.num_splits

    # -- layout of u_L -------------------------------------------------------------------------
    def x_width(self, L: int) -> int:
        if self.kind == "spinal":
            return self.seg if L < self.n else 0
        return self.D

    def x_offset(self, L: int) -> int:
        if self.kind == "spinal" and L < self.n:
            return (L % self.num_splits) * self.seg
        return 0

    def h_offset(self, L: int) -> int:
        if self.kind == "spinal" and 0 < L < self.n:
            return (L - 1) * self.H
        return 0

    def h_width(self, L: int) -> int:
        if L == self.n:
            return self.n * self.H
        if self.kind == "spinal":
            return self.H if L > 0 else 0
        return L * self.H

    def in_width(self, L: int) -> int:
        """K_L: input features of layer L (L == n is the output layer)."""
        return self.x_width(L) + self.h_width(L)

    def out_width(self, L: int) -> int:
        """N_L: output features of layer L."""
        return self.C if L == self.n else self.H

    def weight_shapes(self) -> list[tuple[int, int]]:
        return [(self.out_width(L), self.in_width(L)) for L in range(self.n + 1)]

    def num_params(self) -> int:
        return sum(N * K + N for N, K in self.weight_shapes())
