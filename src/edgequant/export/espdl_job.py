"""Write an ESP-DL ``.espdl`` file with esp-ppq's own exporter from scales edgequant chose.

``python espdl_job.py MODEL.onnx SPEC.json OUT.espdl`` under a Python that has esp-ppq 1.3.12
(and its torch); it needs nothing of edgequant, so it can run in esp-ppq's own environment.
SPEC holds ``target`` (esp-ppq's ``esp32p4`` / ``esp32s3``), ``bits`` (8 or 16), ``activations``
``{tensor: scale}``, ``weights`` ``{initializer: [scale per channel]}`` and ``int16`` (node names
that run in 16 bits). Every scale is a power of two.

esp-ppq's quantizer runs as usual, with its calibration pass off and one pass added after
``ParameterQuantizePass`` that sets every activation's quantization config (the root of the
configs the tensor shares: a Conv and the Relu fused into it, a Reshape and its input) to the
given scale, and the given weight scales. esp-ppq then derives the biases (``s_in · s_w``) and
aligns Add/Concat inputs to their output as it always does, and ``EspdlExporter`` writes the file.
It answers through files, not stdout (esp-ppq prints its own banner there): what was applied
goes to ``OUT.espdl.json``, an error to ``OUT.espdl.error`` (one line) with exit status 2.
``python espdl_job.py --read FILE.espdl OUT.json`` writes what a file holds (``read``).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path


class JobError(Exception):
    """One line for the caller, written to ``<output>.error``."""


def _configs(var):
    """Every quantization config attached to an activation: its producer's output, its readers' inputs."""
    from esp_ppq.IR.quantize import QuantableOperation

    out = []
    if isinstance(var.source_op, QuantableOperation):
        out.append(var.source_op.output_quant_config[var.source_op.outputs.index(var)])
    for op in var.dest_ops:
        if isinstance(op, QuantableOperation):
            out += [op.input_quant_config[k] for k, v in enumerate(op.inputs) if v is var]
    return out


def main(model_path: str, spec_path: str, out_path: str) -> None:
    import esp_ppq.lib as PFL
    import onnx
    import torch
    from esp_ppq.api.espdl_interface import generate_test_value, get_target_platform
    from esp_ppq.api.interface import dispatch_graph, load_onnx_graph
    from esp_ppq.api.setting import QuantizationSettingFactory
    from esp_ppq.core import QuantizationStates
    from esp_ppq.executor import TorchExecutor
    from esp_ppq.quantization.optim import ParameterQuantizePass, QuantizationOptimizationPass

    spec = json.loads(Path(spec_path).read_text())
    acts, weights = spec["activations"], spec.get("weights", {})
    for name, s in list(acts.items()) + [(k, v) for k, vs in weights.items() for v in vs]:
        if not (s > 0 and math.isfinite(s)) or 2.0 ** round(math.log2(s)) != s:  # esp-ppq truncates log2
            raise JobError(f"the scale of {name} is {s}, not a power of two")
    model = onnx.load(model_path)
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    shapes = [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in inputs]
    if any(v <= 0 for s in shapes for v in s):
        raise JobError("every input needs a static shape (give --input-shape NAME=DIMS)")
    report: dict = {"applied": 0, "shared": 0, "conflicts": [], "missing": [], "weights": 0}

    class SetScales(QuantizationOptimizationPass):
        def __init__(self):
            super().__init__(name="edgequant scales")

        def optimize(self, graph, **kwargs) -> None:
            groups: dict[int, tuple] = {}
            for name, var in graph.variables.items():
                if var.is_parameter:
                    continue
                for cfg in _configs(var):
                    root = cfg.dominated_by
                    if root.state != QuantizationStates.FP32:
                        groups.setdefault(id(root), (root, []))[1].append(name)
            for root, names in groups.values():
                given = {acts[n] for n in names if n in acts}
                if not given:
                    if root.state == QuantizationStates.INITIAL:
                        report["missing"].append(names[0])
                    continue
                if len(given) > 1:
                    report["conflicts"].append(sorted(set(names)))
                scale = max(given)  # one scale for what esp-ppq runs as one: the widest, nothing clipped
                root.scale = torch.tensor(scale, dtype=torch.float32)
                root.offset = torch.tensor(0.0, dtype=torch.float32)
                root.state = QuantizationStates.ACTIVATED
                report["applied"] += 1
                report["shared"] += len(set(names)) - 1
            for name, scales in weights.items():
                var = graph.variables.get(name)
                op = var.dest_ops[0] if var is not None and var.is_parameter and var.dest_ops else None
                if op is None or not hasattr(op, "input_quant_config") or op.inputs[1] is not var:
                    continue
                cfg = op.input_quant_config[1]
                new = torch.tensor(scales, dtype=torch.float32)
                if new.numel() == cfg.scale.numel():
                    new = new.reshape(cfg.scale.shape)
                elif new.numel() == 1:
                    new = new.reshape(()).expand_as(cfg.scale).clone()
                else:  # per channel here, per tensor in esp-ppq: the widest channel's scale
                    new = new.max().reshape(cfg.scale.shape)
                    report["widened"] = report.get("widened", 0) + 1
                cfg.scale = new
                cfg.offset = torch.zeros_like(cfg.scale)
                cfg.state = QuantizationStates.ACTIVATED
                report["weights"] += 1

    bits = int(spec["bits"])
    platform = get_target_platform(spec["target"], bits)
    setting = QuantizationSettingFactory.espdl_setting(num_of_bits=bits)
    setting.quantize_activation = False  # edgequant's scales instead of esp-ppq's calibration
    for node in spec.get("int16", []):
        setting.dispatching_table.append(node, get_target_platform(spec["target"], 16))
    with tempfile.TemporaryDirectory() as tmp:
        graph = load_onnx_graph(onnx_import_file=model_path)
        graph = dispatch_graph(graph=graph, platform=platform, dispatcher=setting.dispatcher,
                               dispatching_table=setting.dispatching_table)
        quantizer = PFL.Quantizer(platform, graph)
        build = quantizer.build_quant_pipeline

        def pipeline(setting_):
            pipe = build(setting_)
            at = next(k for k, p in enumerate(pipe._pipeline) if isinstance(p, ParameterQuantizePass)) + 1
            pipe._pipeline.insert(at, SetScales())
            return pipe

        quantizer.build_quant_pipeline = pipeline
        torch.manual_seed(0)
        dummy = [torch.randn(*s) for s in shapes]
        feed = dummy[0] if len(dummy) == 1 else dummy
        quantizer.quantize(inputs=feed, calib_dataloader=[feed, feed], executor=TorchExecutor(graph=graph, device="cpu"),
                           setting=setting, calib_steps=2, collate_fn=None)
        if report["missing"]:
            raise JobError(f"esp-ppq quantizes {len(report['missing'])} tensors edgequant left float "
                  f"({', '.join(report['missing'][:4])}): quantize them too, or keep their layers in int16")
        written = Path(tmp) / "model.espdl"
        PFL.Exporter(platform=platform).export(file_path=str(written), graph=graph,
                                               values_for_test=generate_test_value(graph, "cpu", feed),
                                               export_config=False)
        Path(out_path).write_bytes(written.read_bytes())
    Path(out_path + ".json").write_text(json.dumps(report))


def read(path: str) -> dict:
    """What a ``.espdl`` file holds, through esp-ppq's FlatBuffers bindings: ``{"values": {tensor:
    exponents}, "weights": {initializer: exponents}, "nodes": [op types]}``."""
    import struct

    from esp_ppq.parser.espdl.FlatBuffers.Dl import Model

    data = Path(path).read_bytes()
    if data[:4] != b"EDL2":
        raise JobError(f"{path} is not an .espdl file")
    length = struct.unpack("I", data[8:12])[0]
    graph = Model.Model.GetRootAs(data[16:16 + length], 0).Graph()

    def name(v) -> str:
        return v.Name().decode() if isinstance(v.Name(), bytes) else v.Name()

    values = {}
    for getter, count in ((graph.ValueInfo, graph.ValueInfoLength()), (graph.Input, graph.InputLength()),
                          (graph.Output, graph.OutputLength())):
        for k in range(count):
            v = getter(k)
            if v.ExponentsLength():
                values[name(v)] = v.ExponentsAsNumpy().tolist()
    weights = {}
    for k in range(graph.InitializerLength()):
        t = graph.Initializer(k)
        if t.ExponentsLength():
            weights[name(t)] = t.ExponentsAsNumpy().tolist()
    ops = [graph.Node(k).OpType() for k in range(graph.NodeLength())]
    return {"values": values, "weights": weights, "nodes": [o.decode() if isinstance(o, bytes) else o for o in ops]}


def run(argv: list[str]) -> int:
    """The job's entry point: 0 when done, 2 with ``<output>.error`` written on a JobError."""
    if len(argv) != 3:
        raise SystemExit("usage: python espdl_job.py MODEL.onnx SPEC.json OUT.espdl | --read FILE.espdl OUT.json")
    target = argv[2]
    try:
        if argv[0] == "--read":
            Path(target).write_text(json.dumps(read(argv[1])))
        else:
            main(*argv)
    except JobError as exc:
        Path(target + ".error").write_text(str(exc))
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]))
