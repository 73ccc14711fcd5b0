"""MTCNN's P-, R- and O-Net from facenet-pytorch's pretrained weights, exported to ONNX (needs torch).

``python -m bench.mtcnn pnet|rnet|onet WEIGHTS.pt OUT.onnx`` — run by the zoo with the ``torch``
extra's interpreter; layer names follow the state dicts shipped in the wheel. Every net returns
the face probability first (``face_prob``, softmax over [not face, face]).
"""

from __future__ import annotations

import sys

SIZES = {"pnet": 12, "rnet": 24, "onet": 48}


def _nets():
    import torch
    from torch import nn

    def block(cin, cout, k):
        return nn.Conv2d(cin, cout, k), nn.PReLU(cout)

    class PNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.prelu1 = block(3, 10, 3)
            self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv2, self.prelu2 = block(10, 16, 3)
            self.conv3, self.prelu3 = block(16, 32, 3)
            self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
            return torch.softmax(self.conv4_1(x), 1), self.conv4_2(x)

    class RNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.prelu1 = block(3, 28, 3)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = block(28, 48, 3)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = block(48, 64, 2)
            self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
            self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

        def forward(self, x):
            x = self.pool2(self.prelu2(self.conv2(self.pool1(self.prelu1(self.conv1(x))))))
            x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).contiguous()
            x = self.prelu4(self.dense4(x.flatten(1)))
            return torch.softmax(self.dense5_1(x), 1), self.dense5_2(x)

    class ONet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.prelu1 = block(3, 32, 3)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = block(32, 64, 3)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = block(64, 64, 3)
            self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv4, self.prelu4 = block(64, 128, 2)
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

    return {"pnet": PNet, "rnet": RNet, "onet": ONet}


def build(which: str, weights: str, out: str) -> None:
    import torch

    torch.manual_seed(0)
    net = _nets()[which]().eval()
    net.load_state_dict(torch.load(weights, map_location="cpu"))
    names = ["face_prob", "box"] + (["landmarks"] if which == "onet" else [])
    size = SIZES[which]
    torch.onnx.export(net, (torch.zeros(1, 3, size, size),), out, input_names=["image"], output_names=names,
                      opset_version=13, dynamic_axes={"image": {0: "batch"}}, dynamo=False)


if __name__ == "__main__":
    build(sys.argv[1], sys.argv[2], sys.argv[3])
