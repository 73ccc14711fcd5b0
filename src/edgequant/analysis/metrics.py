"""Output fidelity metrics, accumulated over batches without keeping the tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two flattened tensors (1.0 when both are all zero)."""
    x, y = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 and ny == 0:
        return 1.0
    if nx == 0 or ny == 0:
        return 0.0
    return float(np.dot(x, y) / (nx * ny))


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σref² / Σ(ref − test)²)`` in dB."""
    r, t = ref.reshape(-1).astype(np.float64), test.reshape(-1).astype(np.float64)
    noise = float(np.sum((r - t) ** 2))
    signal = float(np.sum(r**2))
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)


@dataclass
class FidelityAccumulator:
    """Running sums for cosine and SQNR over many samples of one output (pooled)."""

    dot: float = 0.0
    ref2: float = 0.0
    test2: float = 0.0
    noise: float = 0.0
    count: int = 0

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        if ref.dtype.kind not in "f" or ref.shape != test.shape:
            return
        r, t = ref.reshape(-1).astype(np.float64), test.reshape(-1).astype(np.float64)
        self.dot += float(r @ t)
        self.ref2 += float(r @ r)
        self.test2 += float(t @ t)
        self.noise += float(((r - t) ** 2).sum())
        self.count += 1

    @property
    def cosine(self) -> float:
        if self.ref2 == 0 and self.test2 == 0:
            return 1.0
        if self.ref2 == 0 or self.test2 == 0:
            return 0.0
        return self.dot / float(np.sqrt(self.ref2 * self.test2))

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return float("inf")
        if self.ref2 == 0:
            return float("-inf")
        return float(10.0 * np.log10(self.ref2 / self.noise))
