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


SNR_FLAG = 0.1  # XQuant / PPQ: noise power over signal power above this is flagged
COSINE_FLAG = 0.99


@dataclass(frozen=True)
class Metrics:
    """Error of a test tensor against its float reference, pooled over samples.

    * ``snr``: noise power / signal power, ``Σ(r − t)² / Σr²`` (lower is better; > 0.1 flagged);
    * ``sqnr_db``: ``10·log10(Σr² / Σ(r − t)²)``;
    * ``cosine``: ``Σrt / √(Σr²·Σt²)``;
    * ``euclidean``: TPU-MLIR's similarity ``1 − ‖r − t‖ / ‖(r + t)/2‖``;
    * ``mse``: mean squared error per element; ``max_abs``: largest absolute error;
    * ``nonfinite``: elements that are inf/NaN in the test tensor but finite in the reference
      (left out of the sums above; any makes the tensor flagged and ranked worst).
    """

    cosine: float
    sqnr_db: float
    snr: float
    euclidean: float
    mse: float
    max_abs: float
    nonfinite: int = 0

    @property
    def flagged(self) -> bool:
        return self.nonfinite > 0 or self.snr > SNR_FLAG or self.cosine < COSINE_FLAG

    @property
    def badness(self) -> tuple[int, float]:
        """Sort key, worst first when sorted descending: non-finite values, then low cosine."""
        return (self.nonfinite > 0, 1.0 - self.cosine)

    def as_dict(self) -> dict[str, float]:
        return {"cosine": self.cosine, "sqnr_db": self.sqnr_db, "snr": self.snr, "euclidean": self.euclidean,
                "mse": self.mse, "max_abs": self.max_abs, "nonfinite": self.nonfinite}


def compare(ref: np.ndarray, test: np.ndarray) -> Metrics:
    """Metrics of one pair of tensors (see ``Metrics``)."""
    acc = FidelityAccumulator()
    acc.update(ref, test)
    return acc.metrics()


@dataclass
class FidelityAccumulator:
    """Running sums for the ``Metrics`` of one tensor over many samples, keeping no tensors.

    Tensors of another shape than the reference (or not floating point) are skipped.
    """

    dot: float = 0.0
    ref2: float = 0.0
    test2: float = 0.0
    noise: float = 0.0
    elements: int = 0
    max_abs: float = 0.0
    nonfinite: int = 0
    count: int = 0

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        if ref.dtype.kind not in "f" or ref.shape != test.shape:
            return
        r = np.ascontiguousarray(ref, np.float32).reshape(-1)
        t = np.ascontiguousarray(test, np.float32).reshape(-1)
        finite = np.isfinite(r)
        bad = finite & ~np.isfinite(t)
        if not finite.all() or bad.any():
            self.nonfinite += int(bad.sum())
            keep = finite & ~bad
            r, t = r[keep], t[keep]
        # float32 products (BLAS), accumulated per sample in float64; in float64 throughout when
        # float32 overflows (values beyond ~1e19)
        with np.errstate(over="ignore", invalid="ignore"):
            d = r - t
            sums = [float(np.dot(a, b)) for a, b in ((r, t), (r, r), (t, t), (d, d))]
        if not all(np.isfinite(sums)):
            r64, t64 = r.astype(np.float64), t.astype(np.float64)
            d64 = r64 - t64
            sums = [float(np.dot(a, b)) for a, b in ((r64, t64), (r64, r64), (t64, t64), (d64, d64))]
            d = d64
        self.dot += sums[0]
        self.ref2 += sums[1]
        self.test2 += sums[2]
        self.noise += sums[3]
        self.elements += r.size
        if r.size:
            self.max_abs = max(self.max_abs, float(np.abs(d).max()))
        self.count += 1

    def merge(self, other: FidelityAccumulator) -> None:
        """Add ``other``'s sums: the figures of both sample sets pooled."""
        for f in ("dot", "ref2", "test2", "noise", "elements", "nonfinite", "count"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.max_abs = max(self.max_abs, other.max_abs)

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
        if self.ref2 <= 0:
            return float("-inf")
        return float(10.0 * np.log10(self.ref2 / self.noise))

    @property
    def snr(self) -> float:
        if self.noise == 0:
            return 0.0
        return self.noise / self.ref2 if self.ref2 else float("inf")

    @property
    def euclidean(self) -> float:
        mean2 = (self.ref2 + 2 * self.dot + self.test2) / 4  # ‖(r + t)/2‖²
        if self.noise == 0:
            return 1.0
        return 1.0 - float(np.sqrt(self.noise / mean2)) if mean2 > 0 else float("-inf")

    def metrics(self) -> Metrics:
        mse = self.noise / self.elements if self.elements else 0.0
        return Metrics(self.cosine, self.sqnr_db, self.snr, self.euclidean, mse, self.max_abs, self.nonfinite)


#: Rows whose two most likely classes are closer than this in float decide nothing.
UNDECIDED_MARGIN = 0.1


def decisions_agree(ref: np.ndarray, got: np.ndarray) -> bool:
    """Does every decided row (top-1 ahead of top-2 by ``UNDECIDED_MARGIN``) keep its argmax?

    A sample is judged whole: one flipped frame of forty can change a decoded text line, so a
    share of agreeing rows pooled over samples hides broken samples.
    """
    return row_flips(ref, got)[0] == 0


def row_flips(ref: np.ndarray, got: np.ndarray) -> tuple[int, int]:
    """(decided rows whose argmax changed, decided rows) of class-probability rows."""
    ref, got = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, ref.shape[-1])
    top2 = np.partition(ref, -2, axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] >= UNDECIDED_MARGIN
    return int((ref[decided].argmax(-1) != got[decided].argmax(-1)).sum()), int(decided.sum())


def is_sequence(x: np.ndarray) -> bool:
    """A sequence of class-probability rows per sample ([N, T, C] or [T, N, C], more than one
    row): a CTC recognizer's or a tagger's output, read by decoding, not row by row."""
    return x.ndim >= 3 and x.size // x.shape[-1] > 1


def decoded(probs: np.ndarray, blank: int | None) -> tuple[int, ...]:
    """The sequence a greedy CTC decoder reads from rows of class probabilities: the top-1 of
    each row, repeats collapsed, then ``blank`` dropped."""
    top = probs.reshape(-1, probs.shape[-1]).argmax(-1)
    if not top.size:
        return ()
    kept = top[np.concatenate([[True], top[1:] != top[:-1]])]
    return tuple(int(k) for k in kept if k != blank)


def blank_class(probs: np.ndarray) -> int | None:
    """The CTC blank of a sequence output: the first or the last class (the conventions of
    PaddleOCR and PyTorch, and of TensorFlow), whichever float picks on more rows; None where
    float picks neither."""
    top = probs.reshape(-1, probs.shape[-1]).argmax(-1)
    first, last = int((top == 0).sum()), int((top == probs.shape[-1] - 1).sum())
    if not first and not last:
        return None
    return 0 if first >= last else probs.shape[-1] - 1


def is_distribution(x: np.ndarray | None) -> bool:
    """Rows of class probabilities along the last axis (a softmax output)?"""
    if x is None or x.dtype.kind != "f" or x.ndim == 0 or x.shape[-1] < 2 or not x.size:
        return False
    return bool(np.all(x >= 0) and np.all(x <= 1) and np.allclose(x.sum(axis=-1), 1.0, atol=1e-3))


def is_score(x: np.ndarray | None) -> bool:
    """Independent scores in [0, 1] (sigmoid outputs, masks, a voice or face probability),
    not rows of class probabilities?"""
    if x is None or x.dtype.kind != "f" or not x.size or is_distribution(x):
        return False
    return bool(np.all(x >= 0) and np.all(x <= 1))


@dataclass
class DecisionTally:
    """How often an output's decisions survive quantization, over samples.

    Class probabilities (``is_distribution``): samples whose every confident row keeps its
    top-1 class (``decisions_agree``), and the confident rows that change it, pooled. Scores in [0, 1] (``is_score``): the confident elements
    (float at least ``UNDECIDED_MARGIN`` from 0.5) that land on the other side of 0.5, counted
    against the positive decisions as 1 − F1 = (fp + fn) / (2 tp + fp + fn), so that a sparse
    output (note frames, a mask) is not judged by its sea of confident zeros. Sequences of class
    probabilities (``is_sequence``) are also decoded as a greedy CTC decoder reads them
    (``decoded``, blank from float's output): the samples whose decoded sequence is float's.
    A frame that flips at a character boundary changes no text; a misread character does. An
    output is judged as a kind only if every sample's float output is of that kind.
    """

    samples: int = 0
    distributions: int = 0
    agree: int = 0
    rows: int = 0
    rows_flipped: int = 0
    scores: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    sequences_seen: int = 0
    sequences_kept: int = 0

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        if ref.dtype.kind != "f" or ref.shape != np.shape(test):
            return
        self.samples += 1
        test = np.asarray(test)
        if is_distribution(ref):
            self.distributions += 1
            flipped, rows = row_flips(ref, test)
            self.agree += flipped == 0
            self.rows += rows
            self.rows_flipped += flipped
            if is_sequence(ref):
                self.sequences_seen += 1
                blank = blank_class(ref)
                self.sequences_kept += decoded(ref, blank) == decoded(test, blank)
        elif is_score(ref):
            self.scores += 1
            sure = np.abs(ref - 0.5) >= UNDECIDED_MARGIN
            want, got = (ref > 0.5)[sure], (test > 0.5)[sure]
            self.tp += int((want & got).sum())
            self.fp += int((~want & got).sum())
            self.fn += int((want & ~got).sum())

    def merge(self, other: DecisionTally) -> None:
        """Add ``other``'s counts: both sample sets pooled."""
        for f in ("samples", "distributions", "agree", "rows", "rows_flipped", "scores", "tp", "fp", "fn",
                  "sequences_seen", "sequences_kept"):
            setattr(self, f, getattr(self, f) + getattr(other, f))

    @property
    def decisions(self) -> float | None:
        """Share of samples keeping their top-1 decisions (None: not class probabilities)."""
        return self.agree / self.samples if self.samples and self.distributions == self.samples else None

    @property
    def sequences(self) -> float | None:
        """Share of samples whose decoded sequence is float's (None: not a sequence of class
        probabilities)."""
        if not self.samples or self.sequences_seen != self.samples:
            return None
        return self.sequences_kept / self.samples

    @property
    def row_flips(self) -> float | None:
        """Share of confident class-probability rows whose top-1 changed (None: not class
        probabilities, or no confident row)."""
        return self.rows_flipped / self.rows if self.decisions is not None and self.rows else None

    @property
    def flipped(self) -> int:
        """Confident scores on the other side of 0.5."""
        return self.fp + self.fn

    @property
    def flips(self) -> float | None:
        """1 − F1 of the confident score decisions (None: not scores, or no positive decision)."""
        if not self.samples or self.scores != self.samples or not self.tp + self.flipped:
            return None
        return self.flipped / (2 * self.tp + self.flipped)
