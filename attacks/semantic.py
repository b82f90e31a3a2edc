"""Semantic backdoor: images of one natural class pushed to the target, with no artificial trigger.

This is the variant of the SDFC code (WenkeHuang/SDFC): training images of a source class (3), with
Gaussian noise N(0, sigma^2) added (sigma = 0.05), relabelled to the target class (2). The SDFC
code's training path for this attack returns None, so what it trains with is inferred from its
settings: add noise to source-class images and relabel them to the target.

- `poison_batch` picks round(poison_ratio * #source-class samples in the batch) of the batch's
  source-class samples only (default: all of them), adds noise drawn from the given generator, clamps
  to [0, 1] and relabels them to `target_label`. Other samples are untouched.
- `apply_trigger` adds noise drawn from a fresh torch.Generator seeded with `seed` on every call, so
  the ASR of a given model and test set is deterministic.
- `asr_mask` selects the source-class test samples, whatever `exclude_target` says: the ASR of a
  semantic backdoor is the share of source-class test images classified as the target.

Inferred: sigma is in pixel space ([0, 1]), like every trigger in thorn.
"""

from __future__ import annotations

import torch

from attacks.base import SourceClassPoison


class SemanticBackdoor(SourceClassPoison):
    def __init__(self, source_label: int = 3, target_label: int = 2, sigma: float = 0.05,
                 poison_ratio: float = 1.0, seed: int = 0) -> None:
        super().__init__(source_label, target_label, poison_ratio)
        if not float(sigma) >= 0.0:
            raise ValueError(f"attack.poison.sigma={sigma} must be >= 0")
        self.sigma, self.seed = float(sigma), int(seed)

    def add_noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=generator) * self.sigma
        return (x + noise.to(x.device, x.dtype)).clamp(0.0, 1.0)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_noise(x, torch.Generator().manual_seed(self.seed))

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = self.choose_source_samples(y, generator)
        if not mask.any():
            return x, y, mask
        x, y = x.clone(), y.clone()
        x[mask] = self.add_noise(x[mask], generator)
        y[mask] = self.target_label
        return x, y, mask
