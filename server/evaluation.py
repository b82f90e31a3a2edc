"""Central evaluation of the global model: main accuracy (MA) and attack success rate (ASR).

MA: top-1 accuracy on the clean test set.
ASR: share of triggered test samples classified as the target label, over the test samples whose
true label is not the target (`asr.exclude_target=true`, the default). With `false`, target-class
samples count too, which reproduces the SDFC code's definition (a clean model then scores about
1/num_classes by construction).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from attacks.base import TriggerPoison
from task.data import InputSpec
from task.train import predict


def main_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, spec: InputSpec, device: torch.device,
                  batch_size: int = 512) -> float:
    return float((predict(model, x, spec, device, batch_size) == y).mean()) if len(y) else float("nan")


def attack_success_rate(model: nn.Module, x: np.ndarray, y: np.ndarray, spec: InputSpec, device: torch.device,
                        poison: TriggerPoison, exclude_target: bool = True, batch_size: int = 512) -> float:
    idx = np.flatnonzero(poison.asr_mask(y, exclude_target))
    if len(idx) == 0:
        return float("nan")
    pred = predict(model, x[idx], spec, device, batch_size, transform=poison.apply_trigger)
    return float((pred == poison.target_label).mean())
