"""Label flipping: an untargeted data-poisoning attack without any trigger (e.g. Tolpegin, Truex,
Gursoy, Liu, "Data Poisoning Attacks Against Federated Learning Systems", 2020,
https://arxiv.org/abs/2007.08432).

Malicious clients relabel samples of `source_label` as `target_label` and leave the pixels alone.
`poison_batch` relabels round(poison_ratio * #source-class samples in the batch) of the batch's
source-class samples (default: all of them). `apply_trigger` returns an unchanged copy, and
`asr_mask` selects the source-class test samples whatever `exclude_target` says, so the "ASR" thorn
reports is the flip success: the share of source-class test images classified as the target.

Inferred: one (source, target) pair per run, as in the paper's experiments; several pairs would be
several attacks.
"""

from __future__ import annotations

import numpy as np
import torch

from attacks.base import TriggerPoison


class LabelFlip(TriggerPoison):
    def __init__(self, source_label: int = 0, target_label: int = 2, poison_ratio: float = 1.0) -> None:
        super().__init__(target_label, poison_ratio)
        if int(source_label) == int(target_label):
            raise ValueError(f"attack.poison.source_label={source_label} must differ from target_label")
        if int(source_label) < 0:
            raise ValueError(f"attack.poison.source_label={source_label} must be a class index >= 0")
        self.source_label = int(source_label)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def asr_mask(self, y: np.ndarray, exclude_target: bool = True) -> np.ndarray:
        return np.asarray(y) == self.source_label

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = torch.zeros(x.shape[0], dtype=torch.bool)
        candidates = torch.nonzero(y.cpu() == self.source_label).flatten()
        count = round(self.poison_ratio * len(candidates))
        if count == 0:
            return x, y, mask
        mask[candidates[torch.randperm(len(candidates), generator=generator)[:count]]] = True
        y = y.clone()
        y[mask] = self.target_label
        return x, y, mask
