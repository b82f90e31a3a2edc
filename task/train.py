"""Local training and evaluation loops (plain PyTorch, nothing Flower-specific).

A `batch_hook` receives every pixel-space batch before normalisation: that is where a malicious
client stamps its trigger, so the poisoned share is fresh per batch and augmentation never erases it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from task.data import InputSpec, to_unit_float

BatchHook = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def build_model(cfg: DictConfig, spec: InputSpec, num_classes: int) -> nn.Module:
    """Instantiate `cfg.model.net` (`_target_`) for the input the model will see."""
    return instantiate(cfg.model.net, in_channels=spec.channels, num_classes=num_classes,
                       image_size=spec.image_size)


def seed_everything(*seed_parts: int) -> torch.Generator:
    """Seed torch's global RNG (weight init, dropout) from a tuple; return a generator for batching."""
    seed = int(np.random.SeedSequence([int(s) for s in seed_parts]).generate_state(1)[0])
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class LocalTrainingConfig:
    epochs: int
    lr: float
    batch_size: int
    momentum: float = 0.0
    weight_decay: float = 0.0

    @classmethod
    def from_cfg(cls, local: DictConfig) -> LocalTrainingConfig:
        return cls(epochs=int(local.epochs), lr=float(local.lr), batch_size=int(local.batch_size),
                   momentum=float(local.momentum), weight_decay=float(local.weight_decay))


def train_local(model: nn.Module, x: np.ndarray, y: np.ndarray, spec: InputSpec, train_cfg: LocalTrainingConfig,
                device: torch.device, generator: torch.Generator, batch_hook: BatchHook | None = None,
                extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
                after_step: Callable[[nn.Module], None] | None = None) -> float:
    """SGD over (x, y) for `epochs`; returns the mean training loss. Batches are shuffled with `generator`.

    `batch_hook` edits each pixel-space batch (poisoning), `extra_loss` adds a term to the loss
    (client-side defenses), `after_step` edits the model after every step (PGD projection, masks)."""
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=train_cfg.lr, momentum=train_cfg.momentum,
                                weight_decay=train_cfg.weight_decay)
    labels = torch.as_tensor(y, dtype=torch.long)
    n = len(labels)
    total_loss, batches = 0.0, 0
    for _ in range(train_cfg.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, train_cfg.batch_size):
            idx = order[start:start + train_cfg.batch_size]
            if len(idx) < 2 and n >= 2:  # a batch of one breaks BatchNorm; drop it
                continue
            xb = to_unit_float(x[idx.numpy()])
            yb = labels[idx]
            if spec.augment:
                xb = spec.augment_batch(xb, generator)
            if batch_hook is not None:
                xb, yb = batch_hook(xb, yb, generator)
            xb, yb = spec.to_model_input(xb.to(device)), yb.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            if extra_loss is not None and (term := extra_loss(model)) is not None:
                loss = loss + term
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(model)
            total_loss += float(loss.detach())
            batches += 1
    return total_loss / max(batches, 1)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, spec: InputSpec, device: torch.device, batch_size: int = 512,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """Predicted labels for uint8 images `x`; `transform` acts in pixel space (e.g. stamping a trigger)."""
    model.to(device).eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = to_unit_float(x[start:start + batch_size])
        if transform is not None:
            xb = transform(xb)
        out.append(model(spec.to_model_input(xb.to(device))).argmax(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def evaluate_loss_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, spec: InputSpec, device: torch.device,
                           batch_size: int = 512) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) on clean data."""
    model.to(device).eval()
    loss_sum, correct = 0.0, 0
    labels = torch.as_tensor(y, dtype=torch.long)
    for start in range(0, len(x), batch_size):
        xb = spec.to_model_input(to_unit_float(x[start:start + batch_size]).to(device))
        yb = labels[start:start + batch_size].to(device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    n = max(len(x), 1)
    return loss_sum / n, correct / n
