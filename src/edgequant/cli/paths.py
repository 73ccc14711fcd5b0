"""Output paths as the CLI takes them."""

from __future__ import annotations

import os
from pathlib import Path

import click


class OutputPath(click.Path):
    """An output path: not empty; for a file (``file=True``), not one ending in a separator,
    which names a folder (``-o out/`` must not write a file called ``out``)."""

    def __init__(self, file: bool = True):
        super().__init__(path_type=Path)
        self.file = file

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; give a path", param, ctx)
        if self.file and isinstance(value, str) and value.endswith(("/", os.sep)):
            self.fail(f"{value!r} names a folder; give a file name, e.g. {value}model.q.onnx", param, ctx)
        return super().convert(value, param, ctx)
