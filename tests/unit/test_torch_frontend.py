"""PyTorch in (``frontends.torch``): modules, TorchScript files and ExportedPrograms to ONNX,
checked against PyTorch; NHWC; errors; torch stays optional."""

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

import edgequant

torch = pytest.importorskip("torch")
torch.set_num_threads(1)


class Net(torch.nn.Module):
    """Conv-Relu-pool-Linear with two outputs: a feature map and logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 5)

    def forward(self, image):
        y = torch.relu(self.conv(image))
        return y, self.head(y.mean((2, 3)))


def _run(model, feeds):
    return ort.InferenceSession(model.SerializeToString()).run(None, feeds)


def _shape(value):
    return [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]


def test_a_module_exports_under_its_argument_names_and_matches_pytorch(rng):
    net = Net().train()
    x = rng.standard_normal((2, 3, 8, 6)).astype(np.float32)
    model = edgequant.from_torch(net, x, output_names=["features", "logits"])
    assert net.training  # the module's mode is given back
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["features", "logits"]
    with torch.no_grad():
        want = [t.numpy() for t in net.eval()(torch.from_numpy(x))]
    for got, ref in zip(_run(model, {"image": x}), want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    dynamic = edgequant.from_torch(net, input_shapes={"img": (1, 3, 8, 6)}, dynamic_batch=True)
    assert [i.name for i in dynamic.graph.input] == ["img"] and _shape(dynamic.graph.input[0]) == ["N", 3, 8, 6]
    assert _run(dynamic, {"img": np.zeros((3, 3, 8, 6), np.float32)})[1].shape == (3, 5)


def test_nhwc_in_and_out_computes_what_the_module_computes_on_permuted_tensors(rng):
    net = Net()
    model = edgequant.from_torch(net, input_shapes=["image=2x8x6x3"], layout="NHWC")
    assert _shape(model.graph.input[0]) == [2, 8, 6, 3] and _shape(model.graph.output[0]) == [2, 8, 6, 4]
    assert _shape(model.graph.output[1]) == [2, 5]
    x = rng.standard_normal((2, 8, 6, 3)).astype(np.float32)
    fmap, logits = _run(model, {"image": x})
    with torch.no_grad():
        ref_map, ref_logits = net(torch.from_numpy(x).permute(0, 3, 1, 2))
    np.testing.assert_allclose(fmap, ref_map.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=1e-5, atol=1e-6)


def test_torchscript_files_and_exported_programs(tmp_path, rng):
    net = Net().eval()
    x = torch.from_numpy(rng.standard_normal((1, 3, 8, 6)).astype(np.float32))
    torch.jit.save(torch.jit.trace(net, x), tmp_path / "net.pt")
    from_file = edgequant.from_torch(tmp_path / "net.pt", input_shapes={"image": (1, 3, 8, 6)})
    program = torch.export.export(net, (x,))
    torch.export.save(program, tmp_path / "net.pt2")
    for model in (from_file, edgequant.from_torch(program, x), edgequant.from_torch(tmp_path / "net.pt2", x)):
        got = _run(model, {model.graph.input[0].name: x.numpy()})
        np.testing.assert_allclose(got[1], net(x)[1].detach().numpy(), rtol=1e-5, atol=1e-6)
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(edgequant.ModelLoadError, match="holds weights .* not TorchScript: load them into their nn.Module"):
        edgequant.from_torch(tmp_path / "weights.pt", x)
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(edgequant.ModelLoadError, match="is not a TorchScript or torch.export archive"):
        edgequant.from_torch(tmp_path / "junk.pt", x)


def test_shapes_that_do_not_fit_and_exports_that_differ_are_errors_naming_them(rng):
    net = Net()
    with pytest.raises(edgequant.ConfigError, match=r"does not run on image=1x8x6x3 \(NCHW\): Given "
                                                    r"groups=1, weight of size \[4, 3, 3, 3\], expected input\[1, 8, 6, 3\] "
                                                    r".*; its first layer conv is a Conv2d taking 3 input channels"):
        edgequant.from_torch(net, input_shapes={"image": (1, 8, 6, 3)})
    with pytest.raises(edgequant.ConfigError, match="example_inputs or input_shapes"):
        edgequant.from_torch(net)
    with pytest.raises(edgequant.ConfigError, match="layout 'NCWH' is not one of NCHW, NHWC"):
        edgequant.from_torch(net, input_shapes={"image": (1, 3, 8, 6)}, layout="NCWH")
    with pytest.raises(edgequant.ConfigError, match="is not a shape like 1x3x224x224"):
        edgequant.from_torch(net, input_shapes=["image=1x3xHx6"])

    class Counter(torch.nn.Module):  # a Python-side state: the traced export bakes another value in
        calls = 0

        def forward(self, x):
            self.calls += 1
            return x + float(self.calls)

    with pytest.raises(edgequant.ModelLoadError, match=r"differs from PyTorch at output 'output': max \|difference\| 1 "):
        edgequant.from_torch(Counter(), torch.zeros(1, 4))


def test_quantize_takes_a_module_as_it_takes_its_export(rng):
    net = Net()
    data = [rng.standard_normal((1, 3, 8, 6)).astype(np.float32) for _ in range(20)]
    direct = edgequant.quantize(net, data, input_shapes=["image=1x3x8x6"], eval_samples=4)
    exported = edgequant.quantize(edgequant.from_torch(net, input_shapes={"image": (1, 3, 8, 6)}), data,
                                  input_shapes=["image=1x3x8x6"], eval_samples=4)
    assert direct.model.SerializeToString() == exported.model.SerializeToString()
    nhwc = edgequant.quantize(net, [d.transpose(0, 2, 3, 1) for d in data], example_inputs=data[0].transpose(0, 2, 3, 1),
                              layout="NHWC", eval_samples=4)
    assert _shape(nhwc.model.graph.input[0]) == [1, 8, 6, 3] and nhwc.summary.collapse is None
    assert "NHWC in and out: a Transpose stays beside image, output (ONNX convolutions take NCHW" in nhwc.summary.notes[0]
    with pytest.raises(edgequant.ConfigError, match="example_inputs are for PyTorch models"):
        edgequant.quantize(direct.float_model, data, example_inputs=data[0])
    from_module = edgequant.analyze(net, direct.model, data, example_inputs=data[0], mode="graphwise", num_samples=4)
    from_onnx = edgequant.analyze(direct.float_model, direct.model, data, mode="graphwise", num_samples=4)
    assert [(t.name, t.metrics.cosine) for t in from_module.graphwise] == \
        [(t.name, t.metrics.cosine) for t in from_onnx.graphwise] and from_module.graphwise


def test_without_torch_the_entry_points_say_how_to_install_it_and_the_rest_never_imports_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
    with pytest.raises(edgequant.ConfigError, match=r"pip install 'edgequant\[torch\]'"):
        edgequant.from_torch(tmp_path / "model.pt")
    with pytest.raises(edgequant.ConfigError, match=r"pip install 'edgequant\[torch\]'"):
        edgequant.quantize(tmp_path / "model.pt", [np.zeros((1, 3), np.float32)])
    code = ("import sys, numpy as np, edgequant; from tests.unit.test_quantize_graphs import cnn, calib; "
            "edgequant.quantize(cnn(np.random.default_rng(0)), calib(np.random.default_rng(1), 12), eval_samples=2); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))
