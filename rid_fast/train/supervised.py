"""Supervised-training building blocks shared by the distillation loop and teacher training:
devices and seeds, seeded batching, augmentation, optimizers and schedules, accuracy, and plain
cross-entropy fitting of a classifier."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rid_fast.train.config import OptimConfig

__all__ = [
    "resolve_device",
    "seed_everything",
    "batch_indices",
    "random_crop_flip",
    "build_optimizer",
    "learning_rate",
    "set_learning_rate",
    "accuracy",
    "correct_predictions",
    "fit_classifier",
]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"run.device is {name!r} but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_indices(n: int, batch_size: int, *, seed: int, epoch: int) -> list[torch.Tensor]:
    """A shuffled partition of ``range(n)`` that depends only on (seed, epoch): resuming at an
    epoch boundary replays the same batches."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return list(torch.randperm(n, generator=gen).split(batch_size))


def random_crop_flip(images: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation on a (B, C, H, W) batch: reflect-pad, random crop, random flip."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    rows = torch.randint(0, 2 * padding + 1, (batch,))
    cols = torch.randint(0, 2 * padding + 1, (batch,))
    crops = torch.stack([padded[i, :, r : r + height, c : c + width] for i, (r, c) in enumerate(zip(rows, cols))])
    flip = torch.rand(batch) < 0.5
    crops[flip] = crops[flip].flip(-1)
    return crops


def build_optimizer(cfg: OptimConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if cfg.name in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name must be 'sgd', 'adam' or 'adamw'; got {cfg.name!r}")


def learning_rate(cfg: OptimConfig, epoch: float) -> float:
    """The learning rate at ``epoch`` (0-based, may be fractional): cosine from ``cfg.lr`` to 0
    over ``cfg.epochs``, or constant."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / max(cfg.epochs, 1)))
    if cfg.lr_schedule == "constant":
        return cfg.lr
    raise ValueError(f"optim.lr_schedule must be 'cosine' or 'constant'; got {cfg.lr_schedule!r}")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def correct_predictions(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> int:
    """How many of ``x`` the model classifies as ``y`` says (top-1), in eval mode (the model's
    mode is restored)."""
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
        for i in range(0, len(x), batch_size)
    )
    model.train(was_training)
    return correct


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy in percent, in eval mode (the model's mode is restored)."""
    return 100.0 * correct_predictions(model, x, y, batch_size) / max(len(x), 1)


def fit_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: OptimConfig,
    *,
    seed: int,
    augment: bool = False,
    progress: bool = False,
    description: str = "teacher",
) -> nn.Module:
    """Plain supervised training with cross-entropy (used for teachers)."""
    optimizer = build_optimizer(cfg, list(model.parameters()))
    model.train()
    for epoch in tqdm(range(cfg.epochs), desc=description, disable=not progress, leave=False):
        set_learning_rate(optimizer, learning_rate(cfg, epoch))
        for idx in batch_indices(len(x), cfg.batch_size, seed=seed, epoch=epoch):
            inputs = random_crop_flip(x[idx]) if augment else x[idx]
            loss = F.cross_entropy(model(inputs), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
    return model.eval()
