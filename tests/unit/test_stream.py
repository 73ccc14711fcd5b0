"""Calibration data as users have it (``data.stream``): readers, loaders, datasets and
generators streamed with bounded memory, ``transform_fn``, and errors naming the item."""

import gc
import pickle
from pathlib import Path

import numpy as np
import pytest

import edgequant
from edgequant.data.inputs import model_inputs
from edgequant.data.open import open_calibration
from edgequant.data.stream import StreamSource
from tests.unit.test_quantize_graphs import calib, cnn


def _specs(rng):
    return model_inputs(cnn(rng))


class Batches:
    """A DataLoader-like iterable: ``(images [B, 3, 8, 8], labels)`` batches, a new iterator each pass."""

    def __init__(self, images: list[np.ndarray], batch: int):
        self.images, self.batch, self.passes = images, batch, 0

    def __iter__(self):
        self.passes += 1
        for k in range(0, len(self.images), self.batch):
            chunk = np.concatenate(self.images[k:k + self.batch])
            yield chunk, np.arange(len(chunk))


def test_a_generator_is_read_once_and_spooled_to_disk_not_to_memory(rng):
    images = calib(rng, 10)
    pulled = []

    def gen():
        for i, x in enumerate(images):
            pulled.append(i)
            yield x

    source = open_calibration(gen(), _specs(rng))
    assert isinstance(source, StreamSource) and not pulled  # nothing read before it is needed
    assert len(source) == 10 and pulled == list(range(10))
    folder = source.spooled().folder
    assert len(list(folder.glob("*.npy"))) == 10
    for _ in range(3):  # passes read the spooled files, never the generator again
        got = [s["x"] for s in source.samples(2, 5)]
        assert len(got) == 3 and all(np.array_equal(a, b) for a, b in zip(got, images[2:5]))
    assert pulled == list(range(10))
    assert [s["x"] for s in pickle.loads(pickle.dumps(source)).samples(9)][0].tolist() == images[9].tolist()
    del source, got
    gc.collect()
    assert not Path(folder).exists()  # the spool goes with the source


def test_a_loader_of_image_label_batches_is_reread_each_pass_with_transform_fn(rng):
    images = calib(rng, 11)
    loader = Batches(images, batch=4)
    source = open_calibration(loader, _specs(rng), transform_fn=lambda item: item[0])
    assert len(source) == 11 and source._spool is None  # counted as it streams; nothing kept
    got = [s["x"] for s in source.samples(5, 9)]
    assert [g.shape for g in got] == [(1, 3, 8, 8)] * 4 and np.array_equal(np.concatenate(got), np.concatenate(images[5:9]))
    assert loader.passes == 2


def test_streamed_data_quantizes_to_the_same_bytes_as_the_same_samples_in_a_folder(rng, tmp_path):
    m, images = cnn(rng), calib(rng, 24)
    for i, x in enumerate(images):
        np.save(tmp_path / f"{i:03d}.npy", x)
    want = edgequant.quantize(m, str(tmp_path), eval_samples=4).model.SerializeToString()
    assert edgequant.quantize(m, images, eval_samples=4).model.SerializeToString() == want
    assert edgequant.quantize(m, iter(images), eval_samples=4).model.SerializeToString() == want
    reader = type("Reader", (), {"it": iter([{"x": x} for x in images]), "get_next": lambda self: next(self.it, None)})()
    assert edgequant.quantize(m, reader, eval_samples=4).model.SerializeToString() == want
    pairs = Batches(images, batch=5)
    assert edgequant.quantize(m, pairs, eval_samples=4, transform_fn=lambda b: {"x": b[0]}).model.SerializeToString() == want
    result, _ = edgequant.auto_mixed(m, Batches(images, 8), transform_fn=lambda b: b[0], eval_samples=4)
    assert result.model.graph.node
    report = edgequant.analyze(m, result.model, (x for x in images), num_samples=6)
    assert report.samples == 6


def test_onnxruntime_readers_and_torch_loaders(rng):
    from onnxruntime.quantization import CalibrationDataReader

    images = calib(rng, 9)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": x} for x in images])

        def get_next(self):
            return next(self.it, None)

    class Rewinding(Reader):
        def rewind(self):
            self.it = iter([{"x": x} for x in images])

    once, again = open_calibration(Reader(), _specs(rng)), open_calibration(Rewinding(), _specs(rng))
    assert len(once) == len(again) == 9 and once._spool is not None and again._spool is None
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(once.samples(), again.samples()))

    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.from_numpy(np.concatenate(images)), torch.arange(9))
    loader = open_calibration(DataLoader(data, batch_size=4), _specs(rng), transform_fn=lambda b: b[0])
    dataset = open_calibration(data, _specs(rng), transform_fn=lambda item: item[0])  # map-style: by index
    assert len(loader) == len(dataset) == 9 and loader._spool is None and dataset._spool is None
    for a, b, x in zip(loader.samples(), dataset.samples(), images):
        assert a["x"].dtype == np.float32 and np.array_equal(a["x"], x) and np.array_equal(b["x"], x)


def test_items_of_the_wrong_kind_are_named_with_what_was_expected(rng):
    specs = _specs(rng)
    pairs = ((x, 3) for x in calib(rng, 2))
    with pytest.raises(edgequant.CalibrationDataError,
                       match=r"calibration item 0 is a tuple of 2 \(ndarray, int\); expected an array or tensor.*"
                             r"transform_fn=lambda item: item\[0\]"):
        len(open_calibration(pairs, specs))
    with pytest.raises(edgequant.CalibrationDataError, match="calibration item 1 is a str"):
        len(open_calibration(iter([calib(rng, 1)[0], "x"]), specs))
    with pytest.raises(edgequant.CalibrationDataError, match="calibration is an int: give a path"):
        open_calibration(42, specs)
    with pytest.raises(edgequant.CalibrationDataError, match=r"transform_fn failed on calibration item 0 \(a tuple of 2 \(ndarray, ndarray\)\): IndexError"):
        len(open_calibration(Batches(calib(rng, 2), 2), specs, transform_fn=lambda b: b[0]["image"]))
    with pytest.raises(edgequant.CalibrationDataError, match="yields 0 samples"):
        len(open_calibration(iter([]), specs))


def test_a_list_of_image_label_pairs_gets_the_same_hint(rng):
    pairs = [(x, 1) for x in calib(rng, 3)]
    with pytest.raises(edgequant.CalibrationDataError, match=r"calibration item 0 is a tuple of 2 \(ndarray, int\).*transform_fn"):
        list(open_calibration(pairs, _specs(rng)).samples())
    assert len(open_calibration(pairs, _specs(rng), transform_fn=lambda p: p[0])) == 3
    nested = [x.tolist() for x in calib(rng, 2)]  # arrays written as Python lists still count
    assert [s["x"].shape for s in open_calibration(iter(nested), _specs(rng)).samples()] == [(1, 3, 8, 8)] * 2
