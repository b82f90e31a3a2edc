"""The interfaces every attack implements.

Trigger (data-poisoning) attacks work in pixel space: float NCHW batches in [0, 1], before
normalisation, so a trigger means the same pixels whatever the dataset statistics. They are applied
per batch while a malicious client trains, and to the test set when the server measures ASR.

Model-poisoning attacks act on the malicious client's model: after each optimizer step (e.g. PGD's
projection, Neurotoxin's mask) and after local training (e.g. scaling). They combine with any trigger.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import nn

StateDict = dict[str, torch.Tensor]


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

    def for_attacker(self, attacker_index: int) -> TriggerPoison:
        """The poison attacker number `attacker_index` (0, 1, ...) trains with. The global trigger by
        default; a distributed attack (DBA) hands each attacker its own part."""
        return self

    def asr_mask(self, y: np.ndarray, exclude_target: bool = True) -> np.ndarray:
        """Which test samples count for the ASR: all but the target class (`exclude_target`), or all."""
        return (y != self.target_label) if exclude_target else np.ones(len(y), dtype=bool)

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Trigger and relabel round(poison_ratio * N) samples chosen at random.

        Returns (x, y, poisoned_mask). The count is exact per batch (not a per-sample coin flip),
        so the poisoned share does not drift with small batches. Inputs are not modified in place.
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


class SourceClassPoison(TriggerPoison):
    """A poison that acts on the samples of one source class only (semantic backdoor, label flip):
    it picks round(poison_ratio * #source samples) of each batch's source-class samples, and its
    ASR is the share of source-class test images classified as the target."""

    def __init__(self, source_label: int, target_label: int, poison_ratio: float) -> None:
        super().__init__(target_label, poison_ratio)
        if int(source_label) == int(target_label):
            raise ValueError(f"attack.poison.source_label={source_label} must differ from target_label")
        if int(source_label) < 0:
            raise ValueError(f"attack.poison.source_label={source_label} must be a class index >= 0")
        self.source_label = int(source_label)

    def asr_mask(self, y: np.ndarray, exclude_target: bool = True) -> np.ndarray:
        return np.asarray(y) == self.source_label

    def choose_source_samples(self, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Boolean mask over the batch of the source-class samples to poison."""
        mask = torch.zeros(y.shape[0], dtype=torch.bool)
        candidates = torch.nonzero(y.cpu() == self.source_label).flatten()
        count = round(self.poison_ratio * len(candidates))
        if count > 0:
            mask[candidates[torch.randperm(len(candidates), generator=generator)[:count]]] = True
        return mask


class ModelPoison:
    """Changes a malicious client's model around local training; the default changes nothing.

    `memory` is a dict of tensors that persists across rounds on the client (the ClientApp keeps it
    in `context.state`), e.g. the previous global model for Neurotoxin.
    """

    def before_training(self, global_state: StateDict, memory: dict[str, torch.Tensor]) -> None:
        """Called once per round before the first step, with the global model the round starts from."""

    def after_step(self, model: nn.Module, global_state: StateDict) -> None:
        """Called after every optimizer step; may edit `model`'s parameters in place."""

    def after_training(self, global_state: StateDict, local_state: StateDict) -> StateDict:
        """Called once after local training; returns the state dict the client uploads."""
        return local_state
