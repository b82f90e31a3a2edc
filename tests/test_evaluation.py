"""MA and ASR as DESIGN.md defines them; ASR leaves target-class samples out by default."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from attacks.badnets import BadNets
from server.evaluation import attack_success_rate, main_accuracy
from task.data import InputSpec

SPEC = InputSpec(mean=(0.0,), std=(1.0,), image_size=8, channels=1)


class TriggerDetector(nn.Module):
    """Predicts the target (2) when the bottom-right pixel block is white, else the 'true' class, read
    from the top-left pixel (value = label / 10)."""

    def forward(self, x):
        label = torch.round(x[:, 0, 0, 0] * 10).long()
        triggered = x[:, 0, 6, 6] > 0.99
        logits = torch.full((len(x), 10), -1.0)
        logits[torch.arange(len(x)), torch.where(triggered, torch.full_like(label, 2), label)] = 1.0
        return logits


def images_for(labels: np.ndarray) -> np.ndarray:
    x = np.zeros((len(labels), 8, 8, 1), dtype=np.uint8)
    x[:, 0, 0, 0] = (labels * 25.5).round().astype(np.uint8)
    return x


def test_main_accuracy_counts_correct_predictions():
    y = np.array([0, 1, 2, 3, 4])
    x = images_for(y)
    x[4, 0, 0, 0] = 0  # this one will be predicted as class 0
    assert main_accuracy(TriggerDetector(), x, y, SPEC, torch.device("cpu")) == 0.8


def test_asr_excludes_target_class_samples_by_default():
    y = np.array([2, 2, 0, 1, 3, 4])
    x = images_for(y)
    poison = BadNets(target_label=2, size=2, position="bottom_right")  # covers pixels 5..6
    model = TriggerDetector()
    assert list(np.flatnonzero(poison.asr_mask(y, exclude_target=True))) == [2, 3, 4, 5]
    assert attack_success_rate(model, x, y, SPEC, torch.device("cpu"), poison) == 1.0
    # a model that ignores the trigger: the excluded definition gives 0, the SDFC one 2/6
    tiny = BadNets(target_label=2, size=1, position=[0, 7])  # a pixel the model does not look at
    assert attack_success_rate(model, x, y, SPEC, torch.device("cpu"), tiny, exclude_target=True) == 0.0
    assert np.isclose(attack_success_rate(model, x, y, SPEC, torch.device("cpu"), tiny, exclude_target=False),
                      2 / 6)
