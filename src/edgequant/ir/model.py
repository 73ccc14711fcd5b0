"""Load and save ONNX models (external data included) and upgrade opsets."""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import EncodeError
from onnx import ModelProto, helper, numpy_helper, version_converter

from edgequant.errors import ModelLoadError, OutputError, not_a_file

log = logging.getLogger(__name__)

#: Models larger than this are written with their weights in an external data file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and constant attributes of ``graph`` and, at any depth, its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _tensors(g)


def _check_external_data(proto: ModelProto, path: Path) -> None:
    """Every external data file the model names exists beside it and is long enough for the
    tensors that point into it: otherwise one line naming the file and the first tensor."""
    for t in _tensors(proto.graph):
        if not onnx.external_data_helper.uses_external_data(t):
            continue
        info = {e.key: e.value for e in t.external_data}
        where = path.parent / info.get("location", "")
        if not where.is_file():
            raise ModelLoadError(f"{path}: tensor {t.name!r} keeps its data in {where.name}, which is not beside the "
                                 "model; copy it next to the .onnx file")
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        if end > where.stat().st_size:
            raise ModelLoadError(f"{path}: the external data file {where.name} is truncated ({where.stat().st_size} "
                                 f"bytes; tensor {t.name!r} needs {end}); copy it again in full")


def load_model(model: str | os.PathLike | ModelProto) -> ModelProto:
    """Load a model from a path (external data resolved) or copy a ``ModelProto``."""
    if isinstance(model, ModelProto):
        copy = ModelProto()
        copy.CopyFrom(model)
        return copy
    path = Path(model)
    if not path.is_file():
        raise ModelLoadError(not_a_file("model", path))
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for corrupt files
        raise ModelLoadError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}); "
            "check that the file is complete and was exported as .onnx"
        ) from None
    _check_external_data(proto, path)
    try:
        onnx.load_external_data_for_model(proto, str(path.parent))
    except Exception as exc:
        raise ModelLoadError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}); "
            "check that the file is complete and was exported as .onnx"
        ) from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelLoadError(f"{path} is not an ONNX model (no graph found); is it the right file?")
    return proto


def opset_of(model: ModelProto) -> int:
    """The ai.onnx opset the model imports."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def ensure_opset(model: ModelProto, minimum: int) -> ModelProto:
    """Return the model at ai.onnx opset ``minimum`` or above, converting if needed."""
    current = opset_of(model)
    if current >= minimum:
        return model
    try:
        converted = version_converter.convert_version(model, minimum)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot upgrade the model from opset {current} to {minimum} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "use per-tensor weights and 8-bit types to stay at the model's opset"
        ) from None
    log.info("upgraded model from opset %d to %d", current, minimum)
    return converted


def save_model(model: ModelProto, path: str | os.PathLike) -> Path:
    """Write atomically: a temporary file in the target folder, then rename.

    Models over ~1.8 GB keep their weights in ``<name>.data`` beside the model.
    """
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder does not exist: {folder}; create it or choose another -o")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder is not writable: {folder}; choose another -o")
    large = byte_size(model) > EXTERNAL_DATA_THRESHOLD

    def write(tmp: str) -> None:
        if large:
            save_with_external_data(model, tmp, out.name + ".data")
        else:
            onnx.save_model(model, tmp)

    return _replace_atomically(out, folder, write)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write a file atomically (temporary file in the same folder, then rename)."""
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder does not exist: {folder}; create it or choose another path")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    return _replace_atomically(out, folder, lambda tmp: Path(tmp).write_bytes(payload))


def creation_mode(existing: Path | None = None, base: int = 0o666) -> int:
    """The mode a new file gets (``base`` less the umask), or ``existing``'s own when it is
    being replaced: a temporary file's 0600 never reaches the user."""
    if existing is not None:
        try:
            return stat.S_IMODE(existing.stat().st_mode)
        except OSError:
            pass
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _fsync(path: str | Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot sync a folder
        pass
    finally:
        os.close(fd)


def _replace_atomically(out: Path, folder: Path, write) -> Path:
    """``write(tmp)`` into a temporary file beside ``out``, synced to disk with the mode a
    plain write would give (or ``out``'s own), then renamed over ``out``: a crash leaves the
    old file or the new one, never an empty one."""
    mode = creation_mode(out if out.is_file() else None)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, out)
        _fsync(folder, directory=True)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


#: Initializers with more elements than this are left out of ``skeleton`` copies.
SKELETON_MAX_ELEMENTS = 4096


def byte_size(model: ModelProto) -> int:
    """``model.ByteSize()``, or past 2 GiB (where protobuf raises instead) the bytes its
    initializers hold, which is more than that."""
    try:
        return model.ByteSize()
    except EncodeError:
        return sum(_tensor_bytes(t) for t in model.graph.initializer) + sum(n.ByteSize() for n in model.graph.node)


def append_tensor(tensors, t: onnx.TensorProto) -> None:
    """``tensors.append(t)`` (a repeated TensorProto field), also for a tensor past 2 GiB, which
    protobuf cannot copy whole: then field by field."""
    count = len(tensors)
    try:
        tensors.append(t)
    except EncodeError:
        del tensors[count:]  # the failed copy may have left an empty tensor behind
        new = tensors.add()
        copy_fields(t, new, skip="raw_data")
        new.raw_data = t.raw_data


def _tensor_bytes(t) -> int:
    """What a tensor's data takes, from its shape (a tensor past 2 GiB cannot measure itself)."""
    try:
        return t.ByteSize()
    except EncodeError:
        count = 1
        for d in t.dims:
            count *= d
        return count * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def save_with_external_data(model: ModelProto, path: str | os.PathLike, location: str, size_threshold: int = 1024) -> None:
    """Write ``model`` to ``path`` with the data of every initializer of ``size_threshold`` bytes
    or more in one file ``location`` beside it, in order, without serialising the model whole
    (protobuf stops at 2 GiB) and without changing ``model`` (onnx's own conversion turns the
    given proto's tensors into external references in place)."""
    light = ModelProto()
    copy_fields(model, light, skip="graph")
    copy_fields(model.graph, light.graph, skip="initializer")
    offset = 0
    with open(Path(path).parent / location, "wb") as fh:
        for t in model.graph.initializer:
            inline = t.data_type == onnx.TensorProto.STRING or t.data_location == onnx.TensorProto.EXTERNAL
            data = b"" if inline else (t.raw_data or numpy_helper.to_array(t).tobytes())
            if inline or len(data) < size_threshold:
                light.graph.initializer.append(t)
                continue
            stub = light.graph.initializer.add()
            stub.name, stub.data_type, stub.data_location = t.name, t.data_type, onnx.TensorProto.EXTERNAL
            stub.dims.extend(t.dims)
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
                entry = stub.external_data.add()
                entry.key, entry.value = key, value
            fh.write(data)
            offset += len(data)
    onnx.save_model(light, str(path))


def copy_fields(src, dst, skip: str = "") -> None:
    """Copy every set field of a protobuf message except ``skip`` (no deep copy of it)."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "ListFields"):  # a message
            getattr(dst, field.name).CopyFrom(value)
        elif isinstance(value, (str, bytes, int, float, bool)):
            setattr(dst, field.name, value)
        else:  # a repeated field
            getattr(dst, field.name).extend(value)


def skeleton(model: ModelProto) -> ModelProto:
    """A copy without large weights, for shape inference and structure checks.

    Each large initializer becomes a graph input of the same type and shape, so inference sees
    every shape while small constants (shape vectors, axes) keep their values for data
    propagation. Memory stays near the graph's size instead of the weights'.
    """
    light = ModelProto()
    copy_fields(model, light, skip="graph")
    copy_fields(model.graph, light.graph, skip="initializer")
    inputs = {i.name for i in light.graph.input}
    for t in model.graph.initializer:
        size = 1
        for d in t.dims:
            size *= d
        if size <= SKELETON_MAX_ELEMENTS:
            light.graph.initializer.append(t)
        elif t.name not in inputs:
            light.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light
