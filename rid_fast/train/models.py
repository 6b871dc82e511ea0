"""Teacher and student networks, with named layers to distil from.

* :class:`MLP` — ``blocks.0``, ``blocks.1``, … are Linear–BatchNorm–ReLU blocks (2-D features);
* :class:`CNN` — ``blocks.0``, ``blocks.1``, … are 3×3 Conv–BatchNorm–ReLU blocks (4-D features);
* :class:`WideResNet` — ``block1``, ``block2``, ``block3`` are the three groups of residual blocks
  (4-D features), as in Zagoruyko & Komodakis (2016); the RID paper distils WRN-40-2 into smaller
  WideResNets on CIFAR-10.

:func:`build_model` makes either from a short config dict, e.g. ``{"name": "mlp", "hidden": [16, 16]}``
or ``{"name": "wrn", "depth": 40, "widen": 2}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "CNN", "WideResNet", "build_model", "MODELS"]


class MLP(nn.Module):
    """Flatten, then Linear–BatchNorm–ReLU blocks (``blocks.i``; BatchNorm optional), then a
    linear ``head``.

    Shape: input (B, *) → logits (B, num_classes); ``blocks.i`` outputs (B, hidden[i]).
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, batch_norm: bool = True) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        norm = nn.BatchNorm1d if batch_norm else lambda _: nn.Identity()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(d_in, d_out), norm(d_out), nn.ReLU())
            for d_in, d_out in zip(widths[:-1], widths[1:])
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class CNN(nn.Module):
    """Small convolutional network: ``blocks.i`` are 3×3 Conv–BatchNorm–ReLU blocks at full
    resolution (4-D features (B, channels[i], H, W)), then global average pooling and a linear
    ``head``. Flat inputs are reshaped to ``image_shape`` first (e.g. digits to (1, 8, 8)).
    """

    def __init__(self, image_shape: Sequence[int], channels: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        widths = [self.image_shape[0], *channels]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())
            for c_in, c_out in zip(widths[:-1], widths[1:])
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, *self.image_shape)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


class _WideBasic(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-``depth``-``widen`` for 32×32 images: groups ``block1``/``block2``/``block3`` output
    (B, 16k, 32, 32), (B, 32k, 16, 16), (B, 64k, 8, 8) with k = ``widen``."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4; got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = self._group(widths[0], widths[1], n, stride=1)
        self.block2 = self._group(widths[1], widths[2], n, stride=2)
        self.block3 = self._group(widths[2], widths[3], n, stride=2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _group(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            *(_WideBasic(in_planes if i == 0 else planes, planes, stride if i == 0 else 1) for i in range(n))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _mlp(
    input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (256, 256), batch_norm: bool = True
) -> MLP:
    in_features = 1
    for size in input_shape:
        in_features *= size
    return MLP(in_features, hidden, num_classes, batch_norm=batch_norm)


def _wrn(input_shape: Sequence[int], num_classes: int, depth: int = 16, widen: int = 1) -> WideResNet:
    return WideResNet(depth, widen, num_classes, in_channels=input_shape[0])


def _cnn(
    input_shape: Sequence[int],
    num_classes: int,
    channels: Sequence[int] = (32, 64),
    image_shape: Sequence[int] | None = None,
) -> CNN:
    return CNN(image_shape or input_shape, channels, num_classes)


#: Model name → builder(input_shape, num_classes, **options).
MODELS = {"mlp": _mlp, "cnn": _cnn, "wrn": _wrn}


def build_model(spec: dict, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """A model from ``{"name": ..., **options}`` (see :data:`MODELS`)."""
    options = dict(spec)
    name = options.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"model name must be one of {', '.join(map(repr, MODELS))}; got {name!r}")
    try:
        return MODELS[name](input_shape, num_classes, **options)
    except TypeError as error:
        raise ValueError(f"bad options for model {name!r}: {error}") from None
