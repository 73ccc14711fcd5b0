"""Calibration sources: every file kind, preprocessing, multi-input, and every data error."""

import numpy as np
import pytest
from PIL import Image

from edgequant.data import InputSettings, InputSpec, open_calibration
from edgequant.errors import CalibrationDataError, ConfigError

IMG = InputSpec("x", (None, 3, 4, 6), np.dtype(np.float32))


def samples(src):
    return list(src.samples())


def test_npz_folder_one_sample_or_batch_per_file(tmp_path, rng):
    np.savez(tmp_path / "a.npz", x=rng.standard_normal((1, 3, 4, 6)).astype(np.float32))
    np.savez(tmp_path / "b.npz", x=rng.standard_normal((5, 3, 4, 6)).astype(np.float32))
    src = open_calibration(tmp_path, [IMG])
    assert len(src) == 6
    got = samples(src)
    assert len(got) == 6 and all(s["x"].shape == (1, 3, 4, 6) for s in got)


def test_npz_multi_input_by_key_and_missing_key(tmp_path, rng):
    specs = [InputSpec("a", (1, 2), np.dtype(np.float32)), InputSpec("b", (1, 3), np.dtype(np.int64))]
    np.savez(tmp_path / "s.npz", a=rng.standard_normal((1, 2)), b=np.array([[1, 2, 3]]))
    got = samples(open_calibration(tmp_path, specs))
    assert got[0]["a"].dtype == np.float32 and got[0]["b"].dtype == np.int64
    np.savez(tmp_path / "t.npz", a=rng.standard_normal((1, 2)))
    with pytest.raises(CalibrationDataError, match="no data for input"):
        samples(open_calibration(tmp_path, specs))


def test_npy_files_and_list_file_with_relative_paths(tmp_path, rng):
    d = tmp_path / "data"
    d.mkdir()
    for i in range(3):
        np.save(d / f"{i}.npy", rng.standard_normal((3, 4, 6)).astype(np.float64))
    (tmp_path / "list.txt").write_text("data/0.npy\ndata/2.npy\n")
    assert len(samples(open_calibration(d, [IMG]))) == 3
    got = samples(open_calibration(tmp_path / "list.txt", [IMG]))
    assert len(got) == 2 and got[0]["x"].dtype == np.float32 and got[0]["x"].shape == (1, 3, 4, 6)


def test_raw_files(tmp_path, rng):
    spec = InputSpec("x", (1, 2, 3), np.dtype(np.float32))
    rng.standard_normal((4, 2, 3)).astype(np.float32).tofile(tmp_path / "a.raw")
    assert len(samples(open_calibration(tmp_path, [spec]))) == 4
    np.zeros(5, np.float32).tofile(tmp_path / "a.raw")
    with pytest.raises(CalibrationDataError, match="whole samples"):
        samples(open_calibration(tmp_path, [spec]))


def test_images_resize_mean_std_bgr_and_nhwc(tmp_path):
    pixels = np.zeros((10, 12, 3), np.uint8)
    pixels[..., 0] = 200  # red
    Image.fromarray(pixels).save(tmp_path / "a.png")
    st = InputSettings(mean=(100.0, 0.0, 0.0), std=(2.0, 1.0, 1.0))
    x = samples(open_calibration(tmp_path, [IMG], [st]))[0]["x"]
    assert x.shape == (1, 3, 4, 6)
    np.testing.assert_allclose(x[0, 0], 50.0)  # (200 - 100) / 2
    bgr = samples(open_calibration(tmp_path, [IMG], [InputSettings(color_format="bgr")]))[0]["x"]
    np.testing.assert_allclose(bgr[0, 2], 200.0)
    with pytest.raises(ConfigError, match="--mean has 2 values for .*an image of 3 channels"):
        samples(open_calibration(tmp_path, [IMG], [InputSettings(mean=(1.0, 2.0))]))
    with pytest.raises(ConfigError, match="--std 0.0,0.0,0.0: a standard deviation of 0"):
        samples(open_calibration(tmp_path, [IMG], [InputSettings(std=(0.0, 0.0, 0.0))]))
    nhwc = InputSpec("x", (1, 4, 6, 1), np.dtype(np.float32))
    g = samples(open_calibration(tmp_path, [nhwc], [InputSettings(color_format="gray")]))[0]["x"]
    assert g.shape == (1, 4, 6, 1)


def test_images_keep_their_size_when_dims_are_symbolic(tmp_path):
    spec = InputSpec("x", (1, 1, 8, None), np.dtype(np.float32))
    Image.new("L", (40, 16)).save(tmp_path / "a.png")
    Image.new("L", (20, 16)).save(tmp_path / "b.png")
    got = samples(open_calibration(tmp_path, [spec]))
    assert [s["x"].shape for s in got] == [(1, 1, 8, 20), (1, 1, 8, 10)]


def test_user_function(tmp_path):
    (tmp_path / "pre.py").write_text(
        "import numpy as np\n"
        "def load(paths, params):\n"
        "    return np.stack([np.full(params['input_shape'][1:], len(p), np.float32) for p in paths])\n")
    (tmp_path / "d").mkdir()
    for i in range(5):
        (tmp_path / "d" / f"{i}.dat").write_text("x")
    st = InputSettings(preprocess=f"{tmp_path / 'pre.py'}:load")
    got = samples(open_calibration(tmp_path / "d", [IMG], [st], batch=2))
    assert len(got) == 5 and got[0]["x"].shape == (1, 3, 4, 6)
    with pytest.raises(ConfigError, match="has no function"):
        open_calibration(tmp_path, [IMG], [InputSettings(preprocess=f"{tmp_path / 'pre.py'}:nope")])
    (tmp_path / "one.py").write_text(
        "import numpy as np\n"
        "def load(paths, params):\n"
        "    return np.zeros(params['input_shape'][1:], np.float32)\n")  # one sample, whatever the paths
    one = open_calibration(tmp_path / "d", [IMG], [InputSettings(preprocess=f"{tmp_path / 'one.py'}:load")], batch=4)
    with pytest.raises(CalibrationDataError, match=r"returned 1 sample\(s\) for 4 paths .*one sample per path"):
        samples(one)


def test_multi_input_lists_must_agree(tmp_path, rng):
    specs = [InputSpec("a", (1, 2), np.dtype(np.float32)), InputSpec("b", (1, 2), np.dtype(np.float32))]
    for name, n in (("a", 3), ("b", 2)):
        (tmp_path / name).mkdir()
        for i in range(n):
            np.save(tmp_path / name / f"{i}.npy", rng.standard_normal((1, 2)))
    with pytest.raises(CalibrationDataError, match="different file counts"):
        open_calibration([tmp_path / "a", tmp_path / "b"], specs)
    np.save(tmp_path / "b" / "2.npy", rng.standard_normal((1, 2)))
    got = samples(open_calibration(tmp_path, specs))  # sub-folders named after inputs
    assert len(got) == 3 and set(got[0]) == {"a", "b"}


def test_arrays_and_dicts_in_memory(rng):
    assert len(samples(open_calibration([rng.standard_normal((2, 3, 4, 6))], [IMG]))) == 2
    specs = [InputSpec("a", (1, 2), np.dtype(np.float32)), InputSpec("b", (1, 2), np.dtype(np.float32))]
    with pytest.raises(CalibrationDataError, match="give dicts"):
        samples(open_calibration([np.zeros((1, 2))], specs))


def test_errors_zero_items_shape_dtype_nan(tmp_path, rng):
    with pytest.raises(CalibrationDataError, match="finds 0 items: looked in .* for \\*.jpg"):
        open_calibration(tmp_path, [IMG])
    with pytest.raises(CalibrationDataError, match="not found"):
        open_calibration(tmp_path / "missing", [IMG])
    with pytest.raises(CalibrationDataError, match=r"expects shape \[\?, 3, 4, 6\], got \[1, 3, 5, 6\]"):
        samples(open_calibration([np.zeros((1, 3, 5, 6))], [IMG]))
    bad = np.zeros((1, 3, 4, 6))
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(CalibrationDataError, match="NaN or Inf"):
        samples(open_calibration([bad], [IMG]))
    ints = InputSpec("ids", (1, 3), np.dtype(np.int64))
    with pytest.raises(CalibrationDataError, match="non-integer floats"):
        samples(open_calibration([np.array([[0.5, 1, 2]])], [ints]))
    int32 = InputSpec("ids", (1, 3), np.dtype(np.int32))
    with pytest.raises(CalibrationDataError, match=r"outside \[-2147483648, 2147483647\]"):  # not wrapped around
        samples(open_calibration([np.array([[1, 2, 2**31 + 5]], np.int64)], [int32]))
    with pytest.raises(ConfigError, match="file_type 'tif' not implemented; valid: img, npy, npz, raw"):
        open_calibration(tmp_path, [IMG], [InputSettings(file_type="tif")])
    (tmp_path / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(CalibrationDataError, match="cannot read image"):
        samples(open_calibration(tmp_path, [IMG]))


def test_state_and_scalar_inputs_are_not_split(rng):
    """An LSTM state [2, 1, 64] and a scalar sample rate go with every sample unchanged."""
    specs = [InputSpec("audio", (None, 512), np.dtype(np.float32)),
             InputSpec("state", (2, 1, 64), np.dtype(np.float32)),
             InputSpec("sr", (), np.dtype(np.int64))]
    item = {"audio": rng.standard_normal((3, 512)), "state": np.zeros((2, 1, 64)), "sr": np.array(16000)}
    src = open_calibration([item, item], specs)
    got = samples(src)
    assert len(src) == 6 and len(got) == 6
    assert got[0]["audio"].shape == (1, 512) and got[0]["state"].shape == (2, 1, 64) and got[0]["sr"].shape == ()
    bad = {"audio": rng.standard_normal((3, 512)), "state": np.zeros((2, 1, 64)), "sr": np.array(16000)}
    specs2 = [InputSpec("a", (None, 4), np.dtype(np.float32)), InputSpec("b", (None, 4), np.dtype(np.float32))]
    with pytest.raises(CalibrationDataError, match="different numbers of samples"):
        samples(open_calibration([{"a": np.zeros((2, 4)), "b": np.zeros((3, 4))}], specs2))
    assert bad


def _same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_a_range_of_samples_equals_the_slice_of_all_and_sources_pickle(tmp_path, rng):
    """Shards read ``samples(start, stop)``: the same samples as slicing one pass, from every
    source kind, also after a round trip through pickle (a worker process)."""
    import pickle

    spec = InputSpec("x", (None, 3, 4, 6), np.dtype(np.float32))
    npz, npy, img = tmp_path / "npz", tmp_path / "npy", tmp_path / "img"
    for d in (npz, npy, img):
        d.mkdir()
    for i, n in enumerate((1, 3, 1, 2)):
        np.savez(npz / f"{i}.npz", x=rng.standard_normal((n, 3, 4, 6)).astype(np.float32))
        np.save(npy / f"{i}.npy", rng.standard_normal((n, 3, 4, 6)).astype(np.float32))
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (4, 6, 3), dtype=np.uint8)).save(img / f"{i}.png")
    arrays = [rng.standard_normal((n, 3, 4, 6)).astype(np.float32) for n in (2, 1, 3)]
    for src in (open_calibration(npz, [spec]), open_calibration(npy, [spec]), open_calibration(img, [spec]),
                open_calibration(arrays, [spec])):
        every = list(src.samples())
        again = pickle.loads(pickle.dumps(src))
        for start, stop in ((0, 2), (1, 4), (3, 6), (5, 100), (2, 2)):
            assert _same(list(src.samples(start, stop)), every[start:stop]), (type(src).__name__, start, stop)
            assert _same(list(again.samples(start, stop)), every[start:stop])


def test_an_image_past_the_decompression_bomb_limit_is_refused_in_one_line(tmp_path, monkeypatch):
    from edgequant.data.images import load_image

    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 pixels > 2 × 100: PIL's error, not its warning
    spec = InputSpec("x", (1, 1, 40, 40), np.float32)
    with pytest.raises(CalibrationDataError, match=r"big.png: the image has more than 200 pixels, the limit that "
                                                   r"guards against decompression bombs"):
        load_image(str(path), spec, InputSettings())


def test_files_of_other_types_in_the_folder_are_named_in_a_warning(tmp_path, caplog):
    for i in range(2):
        Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / f"{i}.png")
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "odd.tif")
    (tmp_path / "labels.txt").write_text("cat\n")
    with caplog.at_level("WARNING"):
        got = samples(open_calibration(tmp_path, [IMG]))
    assert len(got) == 2
    assert "2 files skipped (.tif, .txt): calibration reads *.jpg" in caplog.text
