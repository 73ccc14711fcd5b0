"""MTCNN's O-Net from facenet-pytorch's pretrained weights, exported to ONNX (needs torch).

``python -m bench.mtcnn WEIGHTS.pt OUT.onnx`` — run by the zoo with the ``torch`` extra's
interpreter; the layer names follow the state dict shipped in the wheel.
"""

from __future__ import annotations

import sys


def build(weights: str, out: str) -> None:
    import torch
    from torch import nn

    class ONet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
            self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
            self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
            self.dense6_1 = nn.Linear(256, 2)
            self.dense6_2 = nn.Linear(256, 4)
            self.dense6_3 = nn.Linear(256, 10)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.pool3(self.prelu3(self.conv3(x)))
            x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).contiguous()
            x = self.prelu5(self.dense5(x.flatten(1)))
            return torch.softmax(self.dense6_1(x), 1), self.dense6_2(x), self.dense6_3(x)

    torch.manual_seed(0)
    net = ONet().eval()
    net.load_state_dict(torch.load(weights, map_location="cpu"))
    torch.onnx.export(net, (torch.zeros(1, 3, 48, 48),), out, input_names=["image"],
                      output_names=["face_prob", "box", "landmarks"], opset_version=13,
                      dynamic_axes={"image": {0: "batch"}}, dynamo=False)


if __name__ == "__main__":
    build(sys.argv[1], sys.argv[2])
