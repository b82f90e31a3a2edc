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

import torch

from attacks.base import SourceClassPoison


class LabelFlip(SourceClassPoison):
    def __init__(self, source_label: int = 0, target_label: int = 2, poison_ratio: float = 1.0) -> None:
        super().__init__(source_label, target_label, poison_ratio)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = self.choose_source_samples(y, generator)
        if not mask.any():
            return x, y, mask
        y = y.clone()
        y[mask] = self.target_label
        return x, y, mask
