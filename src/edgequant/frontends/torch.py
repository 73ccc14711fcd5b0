"""PyTorch in: an ``nn.Module``, a TorchScript file or an ``ExportedProgram`` to ONNX, checked
against PyTorch on the example inputs.

``from_torch`` exports with the TorchScript-based ``torch.onnx.export`` (which also takes
ScriptModules) and, where that fails, the dynamo-based one. With ``layout="NHWC"`` the exported
model takes and returns channels-last 4-D tensors, through a ``Transpose`` behind each input and
in front of each output (NeuroPilot's guide permutes inside a wrapper module for the same end:
an NHWC converter then cancels them with its own, instead of adding a Transpose at each end).

Shapes are given with names and a layout, so H and W cannot be swapped silently:
``from_torch(net, input_shapes={"image": (1, 224, 224, 3)}, layout="NHWC")``.

torch is imported here only, and only when one of these is called (``edgequant[torch]``).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import sys
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto

from edgequant.errors import ConfigError, ModelLoadError
from edgequant.ir.graph import NameScope
from edgequant.planning.options import parse_input_shapes

log = logging.getLogger(__name__)

#: Suffixes of the PyTorch files ``from_torch`` reads: TorchScript archives and ``torch.export`` programs.
TORCH_SUFFIXES = (".pt", ".pth", ".ts", ".pt2", ".jit")
LAYOUTS = ("NCHW", "NHWC")
DEFAULT_OPSET = 17
#: The export matches PyTorch when every output's largest difference is within this share of
#: its largest value (float32 kernels sum in other orders: about 1e-6 on the zoo's CNNs).
RELATIVE_TOLERANCE = 1e-3


def import_torch(who: str = "PyTorch models") -> Any:
    """``torch``, or one line saying who needs it and how to install it (the optional extra)."""
    try:
        import torch
    except ImportError:
        raise ConfigError(f"{who} need PyTorch: pip install 'edgequant[torch]' (torch==2.13.0)") from None
    return torch


def is_torch_model(model: Any) -> bool:
    """A PyTorch module or program object, or the path of a PyTorch file (by suffix)."""
    if isinstance(model, (str, os.PathLike)):
        return Path(model).suffix.lower() in TORCH_SUFFIXES
    torch = sys.modules.get("torch")  # a torch object exists only where torch is imported already
    if torch is None:
        return False
    kinds: tuple[type, ...] = (torch.nn.Module,)
    program = getattr(getattr(torch, "export", None), "ExportedProgram", None)
    return isinstance(model, kinds + ((program,) if isinstance(program, type) else ()))


def load_torch(path: str | os.PathLike) -> Any:
    """A TorchScript module (``torch.jit.save``) or an ``ExportedProgram`` (``torch.export.save``,
    ``.pt2``) from ``path``; a file of weights or a pickled module is refused (never unpickled)."""
    torch = import_torch()
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model not found: {path}" if not path.exists() else f"{path} is a folder, not a file")
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path} is not a TorchScript or torch.export archive; save the model with "
                             "torch.jit.save(torch.jit.trace(model, example)) or torch.export.save")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if path.suffix.lower() == ".pt2" or any(n.endswith("serialized_exported_program.json") or "/models/" in n
                                            for n in names):
        try:
            return torch.export.load(str(path))
        except Exception as exc:
            raise ModelLoadError(f"{path}: torch.export.load failed: {type(exc).__name__}: {_first_line(exc)}") from None
    if not any("/code/" in n or n.startswith("code/") for n in names):
        raise ModelLoadError(
            f"{path} holds weights (a state dict or a pickled module), not TorchScript: load them into their "
            "nn.Module and pass the module to from_torch, or save it with torch.jit.save(torch.jit.trace(model, example))")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in PyTorch; users still bring it
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelLoadError(f"{path}: torch.jit.load failed: {type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _last_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(exc).__name__


def _first_layer(module: Any) -> str:
    """What the first convolution or linear layer takes, as a hint to the shape the model expects."""
    for name, sub in module.named_modules():
        kind = getattr(sub, "original_name", type(sub).__name__)
        if kind.startswith("Conv") and hasattr(sub, "in_channels"):
            return f"; its first layer {name} is a {kind} taking {sub.in_channels} input channels"
        if kind == "Linear" and hasattr(sub, "in_features"):
            return f"; its first layer {name} is a Linear taking {sub.in_features} features"
    return ""


def _as_module(torch: Any, model: Any) -> tuple[Any, Any]:
    """(what runs in PyTorch, what is exported): the module twice, or an ExportedProgram's
    module and the program (which the dynamo exporter takes as it is)."""
    if isinstance(model, (str, os.PathLike)):
        model = load_torch(model)
    program = getattr(getattr(torch, "export", None), "ExportedProgram", None)
    if isinstance(program, type) and isinstance(model, program):
        return model.module(), model  # type: ignore[attr-defined]
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"from_torch takes an nn.Module, a TorchScript file or an ExportedProgram, "
                          f"got {type(model).__name__}")
    return model, model


def _argument_names(module: Any, count: int) -> list[str]:
    """``forward``'s parameter names (an nn.Module's), else ``input``, ``input_1``…"""
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params][:count]
    except (TypeError, ValueError):
        names = []
    if len(names) != count or len(set(names)) != count:
        names = ["input" if k == 0 else f"input_{k}" for k in range(count)]
    return names


def _examples(torch: Any, module: Any, example_inputs: Any, shapes: list[tuple[str, tuple[int, ...]]],
              names: Sequence[str] | None) -> tuple[list[Any], list[str]]:
    if example_inputs is None:
        if not shapes:
            raise ConfigError("exporting a PyTorch model needs example_inputs or input_shapes "
                              "(--input-shape NAME=DIMS, in the layout the model takes)")
        gen = torch.Generator().manual_seed(0)
        args = [torch.randn(dims, generator=gen) for _, dims in shapes]
        return args, list(names or [n for n, _ in shapes])
    given = list(example_inputs) if isinstance(example_inputs, (tuple, list)) else [example_inputs]
    args = [torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a for a in given]
    if not all(isinstance(a, torch.Tensor) for a in args):
        kinds = ", ".join(type(a).__name__ for a in args)
        raise ConfigError(f"example_inputs must be tensors or arrays (one per input, in forward's order), got {kinds}")
    if shapes:
        for (name, dims), a in zip(shapes, args):
            if tuple(a.shape) != dims:
                raise ConfigError(f"input {name}: example input has shape {list(a.shape)} but input_shapes says "
                                  f"{'x'.join(map(str, dims))}")
    chosen = list(names or [n for n, _ in shapes] or _argument_names(module, len(args)))
    if len(chosen) != len(args):
        raise ConfigError(f"{len(chosen)} input names for {len(args)} example inputs")
    return args, chosen


def _nchw(a: Any) -> Any:
    return a.permute(0, 3, 1, 2).contiguous() if a.dim() == 4 else a


def _nhwc(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if a.ndim == 4 else a


def channels_last(model: ModelProto) -> list[str]:
    """Make ``model`` take and return NHWC where it took and returned NCHW 4-D tensors: a
    ``Transpose`` behind each such input and in front of each such output, names kept; the
    tensors it changed."""
    from onnx import helper

    graph = model.graph
    fresh = NameScope(graph).fresh
    changed, front, back = [], [], []

    def permute(value, perm: list[int]) -> None:
        dims = list(value.type.tensor_type.shape.dim)
        copies = [type(d)() for d in dims]
        for c, d in zip(copies, dims):
            c.CopyFrom(d)
        for d, k in zip(dims, perm):
            d.CopyFrom(copies[k])

    inits = {t.name for t in graph.initializer}
    for value in graph.input:
        if value.name in inits or len(value.type.tensor_type.shape.dim) != 4:
            continue
        inner = fresh(value.name + "_nchw")
        for node in graph.node:
            node.input[:] = [inner if i == value.name else i for i in node.input]
        front.append(helper.make_node("Transpose", [value.name], [inner], name=fresh(value.name + "_to_nchw"), perm=[0, 3, 1, 2]))
        permute(value, [0, 2, 3, 1])
        changed.append(value.name)
    for value in graph.output:
        if len(value.type.tensor_type.shape.dim) != 4:
            continue
        inner = fresh(value.name + "_nchw")
        for node in graph.node:
            node.output[:] = [inner if o == value.name else o for o in node.output]
            node.input[:] = [inner if i == value.name else i for i in node.input]
        back.append(helper.make_node("Transpose", [inner], [value.name], name=fresh(value.name + "_to_nhwc"), perm=[0, 2, 3, 1]))
        permute(value, [0, 2, 3, 1])
        changed.append(value.name)
    nodes = front + list(graph.node) + back
    graph.ClearField("node")
    graph.node.extend(nodes)
    return changed


def _set_mode(module: Any, training: bool) -> None:
    """``module.train(training)``, where the module allows it (an ExportedProgram's module does not)."""
    try:
        module.train(training)
    except NotImplementedError:
        pass


def _flat(out: Any) -> list[Any]:
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flat(v)]
    return [out]


def from_torch(module_or_path: Any, example_inputs: Any = None, *, input_shapes: Any = None, layout: str = "NCHW",
               dynamic_batch: bool = False, opset: int | None = None, input_names: Sequence[str] | None = None,
               output_names: Sequence[str] | None = None) -> ModelProto:
    """An ONNX model computing what the PyTorch model computes (checked on the example inputs).

    ``module_or_path``: an ``nn.Module``, a TorchScript file, or an ``ExportedProgram`` (or its
    ``.pt2`` file). ``example_inputs``: a tensor/array or a tuple of them, in ``forward``'s order
    and in ``layout``; or ``input_shapes`` (``{"image": (1, 224, 224, 3)}``, ``["image=1x224x224x3"]``)
    to export at those shapes from seeded random inputs, the inputs then named after them.
    ``layout="NHWC"``: 4-D inputs and outputs are channels-last. ``dynamic_batch``: axis 0 of
    every input and output is symbolic (``N``). ``opset``: 17 unless given.
    A difference from PyTorch beyond ``RELATIVE_TOLERANCE`` is an error naming the output."""
    torch = import_torch()
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    module, exported = _as_module(torch, module_or_path)
    shapes = list(parse_input_shapes(input_shapes)) if input_shapes else []
    args, names = _examples(torch, module, example_inputs, shapes, input_names)
    given = args  # in ``layout``; the module itself takes NCHW
    if layout == "NHWC":
        args = [_nchw(a) for a in args]
    was_training = bool(getattr(module, "training", False))
    _set_mode(module, False)
    try:
        with torch.no_grad():
            try:
                expected = [t.detach().cpu().numpy() for t in _flat(module(*args))]
            except Exception as exc:  # the shapes do not fit the model
                shown = ", ".join(f"{n}={'x'.join(map(str, a.shape))}" for n, a in zip(names, given))
                raise ConfigError(f"the PyTorch model does not run on {shown} ({layout}): {_last_line(exc)}"
                                  f"{_first_layer(module)}") from None
        outs = list(output_names or ["output" if k == 0 else f"output_{k}" for k in range(len(expected))])
        if len(outs) != len(expected):
            raise ConfigError(f"{len(outs)} output names for the model's {len(expected)} outputs")
        model = _export(torch, exported, tuple(args), names, outs, dynamic_batch, opset or DEFAULT_OPSET)
    finally:
        _set_mode(module, was_training)
    if layout == "NHWC":
        changed = channels_last(model)
        expected = [_nhwc(e) if outs[k] in changed else e for k, e in enumerate(expected)]
        if changed:
            entry = model.metadata_props.add()
            entry.key = "edgequant.layout"  # pipeline.LAYOUT_NOTE_KEY: the summary says it
            entry.value = (f"NHWC in and out: a Transpose stays beside {', '.join(changed)} (ONNX convolutions take "
                           "NCHW; an NHWC converter cancels it with its own)")
            log.info(entry.value)
    _check(model, dict(zip(names, (a.detach().cpu().numpy() for a in given))), expected)
    return model


def _export(torch: Any, module: Any, args: tuple, names: list[str], outs: list[str], dynamic_batch: bool,
            opset: int) -> ModelProto:
    axes = {n: {0: "N"} for n in names + outs} if dynamic_batch else None
    failures = []
    program = not isinstance(module, torch.nn.Module)  # an ExportedProgram: the dynamo exporter's alone
    for dynamo in ((True,) if program else (False, True)):
        buffer = io.BytesIO()
        try:
            kwargs: dict[str, Any] = {"input_names": names, "output_names": outs, "opset_version": opset,
                                      "dynamic_axes": axes, "dynamo": dynamo}
            if dynamo:
                kwargs["external_data"] = False
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet("torch", "onnxscript"):
                warnings.simplefilter("ignore")  # the exporters' notes and progress lines are not the user's
                torch.onnx.export(module, args, buffer, **kwargs)
            return onnx.load_model_from_string(buffer.getvalue())
        except Exception as exc:  # each exporter fails its own ways
            failures.append(f"{'dynamo' if dynamo else 'TorchScript'} exporter: {type(exc).__name__}: {_first_line(exc)}")
            log.debug("torch.onnx.export(dynamo=%s) failed", dynamo, exc_info=True)
    raise ModelLoadError("PyTorch could not export the model to ONNX: " + "; ".join(failures))


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """The named loggers at ERROR while inside (the exporters log notes as warnings)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check(model: ModelProto, feeds: dict[str, np.ndarray], expected: list[np.ndarray]) -> None:
    """The exported model's outputs against PyTorch's, output by output."""
    from edgequant.runtime.session import make_session

    sess = make_session(model)
    wanted = [i.name for i in sess.get_inputs()]
    got = sess.run(None, {k: v for k, v in feeds.items() if k in wanted})
    if len(got) != len(expected):
        raise ModelLoadError(f"the ONNX export has {len(got)} outputs where PyTorch returns {len(expected)}")
    for out, a, b in zip(sess.get_outputs(), got, expected):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise ModelLoadError(f"the ONNX export's output {out.name!r} has shape {list(a.shape)}, "
                                 f"PyTorch's {list(b.shape)}")
        diff, scale = float(np.max(np.abs(a - b), initial=0.0)), float(np.max(np.abs(b), initial=0.0))
        if not diff <= RELATIVE_TOLERANCE * max(scale, 1e-6):
            raise ModelLoadError(f"the ONNX export differs from PyTorch at output {out.name!r}: max |difference| "
                                 f"{diff:.3g} where max |value| is {scale:.3g}")


__all__ = ["from_torch", "is_torch_model", "load_torch"]
