"""Image files → input arrays: resize to the input's H×W, colour format, mean/std, layout."""

from __future__ import annotations

import numpy as np

from edgequant.data.inputs import InputSettings, InputSpec
from edgequant.errors import CalibrationDataError, ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
COLOR_FORMATS = ("rgb", "bgr", "gray")


def infer_layout(spec: InputSpec, settings: InputSettings) -> str:
    """NCHW or NHWC: given, or guessed from where a 1- or 3-sized channel dim sits."""
    if settings.layout:
        layout = settings.layout.upper()
        if layout not in ("NCHW", "NHWC"):
            raise ConfigError(f"layout must be NCHW or NHWC, got {settings.layout!r}")
        return layout
    shape = settings.shape or spec.shape
    if len(shape) != 4:
        raise ConfigError(
            f"input {spec.name!r} has rank {len(shape)}; image files need a 4-D input "
            "(give npy/npz files or a preprocess function instead)"
        )
    if shape[1] in (1, 3):
        return "NCHW"
    if shape[3] in (1, 3):
        return "NHWC"
    return "NCHW"


def _target_size(width: int, height: int, h: int | None, w: int | None) -> tuple[int, int] | None:
    """(W, H) to resize to: the input's; a symbolic side follows the image's aspect ratio."""
    if h is None and w is None:
        return None
    if h is None:
        assert w is not None
        return w, max(1, round(height * w / width))
    if w is None:
        return max(1, round(width * h / height)), h
    return w, h


def load_image(path: str, spec: InputSpec, settings: InputSettings) -> np.ndarray:
    """Read one image as a [1, ...] array laid out and normalised for ``spec``.

    ``(pixel − mean) / std`` per channel, in the channel order given by ``color_format``.
    Symbolic H or W keep the image's own size.
    """
    from PIL import Image, UnidentifiedImageError

    if settings.color_format not in COLOR_FORMATS:
        raise ConfigError(f"color_format must be one of {', '.join(COLOR_FORMATS)}, got {settings.color_format!r}")
    layout = infer_layout(spec, settings)
    shape = settings.shape or spec.shape
    c_axis, h_axis, w_axis = (1, 2, 3) if layout == "NCHW" else (3, 1, 2)
    channels = shape[c_axis] or (1 if settings.color_format == "gray" else 3)
    try:
        with Image.open(path) as raw:
            im = raw.convert("L" if channels == 1 else "RGB")
        size = _target_size(im.width, im.height, shape[h_axis], shape[w_axis])
        if size is not None:
            im = im.resize(size, Image.Resampling.BILINEAR)
        arr: np.ndarray = np.asarray(im, dtype=np.float32)
    except Image.DecompressionBombError:
        raise CalibrationDataError(f"{path}: the image has more than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels, "
                                   "the limit that guards against decompression bombs; resize it first") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise CalibrationDataError(f"{path}: cannot read image ({exc})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if settings.color_format == "bgr" and arr.shape[2] == 3:
        arr = arr[:, :, ::-1]
    for what, values in (("mean", settings.mean), ("std", settings.std)):
        if values is not None and len(np.atleast_1d(values)) not in (1, arr.shape[2]):
            raise ConfigError(f"--{what} has {len(np.atleast_1d(values))} values for {path}, an image of "
                              f"{arr.shape[2]} channel{'s' * (arr.shape[2] > 1)}; give {arr.shape[2]}"
                              f"{' (or 1 for all)' if arr.shape[2] > 1 else ''}")
    if settings.std is not None and np.any(np.asarray(settings.std, dtype=np.float32) == 0):
        raise ConfigError(f"--std {','.join(map(str, np.atleast_1d(settings.std)))}: a standard deviation "
                          "of 0 divides by zero; give positive values")
    if settings.mean is not None:
        arr = arr - np.asarray(settings.mean, dtype=np.float32)
    if settings.std is not None:
        arr = arr / np.asarray(settings.std, dtype=np.float32)
    if layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    if spec.dtype.kind in "iu":
        arr = np.clip(np.rint(arr), np.iinfo(spec.dtype).min, np.iinfo(spec.dtype).max)
    return np.ascontiguousarray(arr[None].astype(spec.dtype))
