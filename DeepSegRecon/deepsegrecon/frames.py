"""The canonical array frame: an image's array re-indexed (axis permutation and flips only, no resampling) so that
its axes point superior, posterior and left, the nearest to its direction matrix; and back. The teeth networks and
the slice-wise organ network work in it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Canonical:
    """How an image's array was re-indexed to the canonical (S, P, L) frame, and back."""

    perm: tuple  # canonical axis a takes original array axis perm[a]
    flip: tuple  # canonical axis a is flipped
    shape: tuple  # original array shape
    spacing: tuple  # canonical spacing per canonical array axis (mm)

    def to_canonical(self, a: np.ndarray) -> np.ndarray:
        a = np.transpose(a, self.perm)
        for ax, f in enumerate(self.flip):
            if f:
                a = np.flip(a, ax)
        return np.ascontiguousarray(a)

    def from_canonical(self, a: np.ndarray) -> np.ndarray:
        for ax, f in enumerate(self.flip):
            if f:
                a = np.flip(a, ax)
        inv = np.argsort(self.perm)
        return np.ascontiguousarray(np.transpose(a, inv))

    def canonical_to_original_index(self, idx: np.ndarray) -> np.ndarray:
        """(N, 3) canonical array indices (continuous) -> original array indices (k, j, i)."""
        idx = np.asarray(idx, float).copy()
        cshape = [self.shape[p] for p in self.perm]
        for ax, f in enumerate(self.flip):
            if f:
                idx[:, ax] = cshape[ax] - 1 - idx[:, ax]
        out = np.empty_like(idx)
        for ax, p in enumerate(self.perm):
            out[:, p] = idx[:, ax]
        return out


def canonical_frame(image) -> Canonical:
    """The axis permutation/flips that make array axes point S, P, L (nearest to the direction matrix)."""
    from scipy.optimize import linear_sum_assignment

    d = np.asarray(image.direction, float)  # columns: LPS vectors of i, j, k
    # array axis n (0=k, 1=j, 2=i) has direction column 2-n
    cols = np.stack([d[:, 2], d[:, 1], d[:, 0]], 1)  # cols[:, n] = LPS vector of array axis n
    # canonical axis a (0=S, 1=P, 2=L) wants LPS component 2, 1, 0
    want = [2, 1, 0]
    cost = -np.abs(np.array([[cols[want[a], n] for n in range(3)] for a in range(3)]))
    _, perm = linear_sum_assignment(cost)
    flip = tuple(bool(cols[want[a], perm[a]] < 0) for a in range(3))
    sp_arr = (image.spacing[2], image.spacing[1], image.spacing[0])  # spacing per array axis
    spacing = tuple(float(sp_arr[p]) for p in perm)
    return Canonical(tuple(int(p) for p in perm), flip, tuple(image.array.shape), spacing)
