"""Streaming observers: each batch is reduced to a fixed-size state as it arrives."""

from edgequant.calibration.observers import HistogramObserver, MinMaxObserver, make_observer

__all__ = ["HistogramObserver", "MinMaxObserver", "make_observer"]
