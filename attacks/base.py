"""The interface every data-poisoning (trigger) attack implements.

Poisons work in pixel space: float NCHW batches in [0, 1], before augmentation-independent
normalisation, so a trigger means the same pixels whatever the dataset statistics. They are applied
per batch while a malicious client trains, and to the whole test set when the server measures ASR.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class TriggerPoison(ABC):
    """A backdoor: a trigger stamped on inputs, and the label those inputs are pushed to."""

    def __init__(self, target_label: int, poison_ratio: float) -> None:
        if not 0.0 <= poison_ratio <= 1.0:
            raise ValueError(f"poison_ratio={poison_ratio} must be in [0, 1]")
        self.target_label = int(target_label)
        self.poison_ratio = float(poison_ratio)

    @abstractmethod
    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Return a copy of the pixel-space batch `x` (N, C, H, W) with the trigger on every sample."""

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Trigger and relabel round(poison_ratio * N) samples chosen at random.

        Returns (x, y, poisoned_mask). The count is exact per batch (not a per-sample coin flip),
        so the poisoned share does not drift with small batches.
        """
        n = x.shape[0]
        count = round(self.poison_ratio * n)
        mask = torch.zeros(n, dtype=torch.bool)
        if count == 0:
            return x, y, mask
        chosen = torch.randperm(n, generator=generator)[:count]
        mask[chosen] = True
        x = x.clone()
        y = y.clone()
        x[mask] = self.apply_trigger(x[mask])
        y[mask] = self.target_label
        return x, y, mask
