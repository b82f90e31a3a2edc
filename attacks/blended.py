"""Blended: a whole-image pattern mixed into the input (Chen, Liu, Li, Lu, Song, "Targeted Backdoor
Attacks on Deep Learning Systems Using Data Poisoning", 2017, https://arxiv.org/abs/1712.05526).

The poisoned input is x' = (1 - alpha) * x + alpha * pattern, the paper's blended-injection strategy.
The paper blends a fixed image (a cartoon face) or random noise; thorn offers two patterns that need
no image file:

- `noise`: uniform noise in [0, 1], drawn once per (C, H, W) from a torch.Generator seeded with `seed`
  and cached, so every client and the server see the same pattern.
- `stripes`: deterministic diagonal stripes, value 1 where ((row + col) // STRIPE_WIDTH) is even and
  0 elsewhere, on every channel (the stripe width is fixed, not a config key).

The paper trains with a small alpha and may test with a larger one to make the trigger stronger at
inference; `test_alpha` (null = alpha) is the blend used by `apply_trigger` for the ASR, while
`poison_batch` always blends training samples with `alpha`. Since x and pattern are in [0, 1], so is
the blend.
"""

from __future__ import annotations

import torch

from attacks.base import TriggerPoison

PATTERNS = ("noise", "stripes")
STRIPE_WIDTH = 2


def _check_alpha(key: str, value: float) -> float:
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"attack.poison.{key}={value} must be in (0, 1]")
    return value


class Blended(TriggerPoison):
    def __init__(self, target_label: int = 2, poison_ratio: float = 0.5, alpha: float = 0.2,
                 test_alpha: float | None = None, pattern: str = "noise", seed: int = 0) -> None:
        super().__init__(target_label, poison_ratio)
        if pattern not in PATTERNS:
            raise ValueError(f"attack.poison.pattern={pattern!r} is unknown; allowed: {', '.join(PATTERNS)}")
        self.alpha = _check_alpha("alpha", alpha)
        self.test_alpha = None if test_alpha is None else _check_alpha("test_alpha", test_alpha)
        self.pattern, self.seed = pattern, int(seed)
        self._cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def pattern_image(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The (C, H, W) pattern blended into the inputs, in [0, 1]; built once per shape."""
        key = (channels, height, width)
        if key not in self._cache:
            if self.pattern == "noise":
                generator = torch.Generator().manual_seed(self.seed)
                image = torch.rand(channels, height, width, generator=generator)
            else:
                diagonal = torch.arange(height)[:, None] + torch.arange(width)[None, :]
                image = ((diagonal // STRIPE_WIDTH) % 2 == 0).float().expand(channels, -1, -1).clone()
            self._cache[key] = image
        return self._cache[key]

    def blend(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        pattern = self.pattern_image(*x.shape[1:]).to(x.device, x.dtype)
        return ((1.0 - alpha) * x + alpha * pattern[None]).clamp(0.0, 1.0)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """The test-time trigger: blend with `test_alpha` (or `alpha` when it is null)."""
        return self.blend(x, self.alpha if self.test_alpha is None else self.test_alpha)

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As the base class, but training samples are always blended with `alpha`."""
        n = x.shape[0]
        count = round(self.poison_ratio * n)
        mask = torch.zeros(n, dtype=torch.bool)
        if count == 0:
            return x, y, mask
        mask[torch.randperm(n, generator=generator)[:count]] = True
        x, y = x.clone(), y.clone()
        x[mask] = self.blend(x[mask], self.alpha)
        y[mask] = self.target_label
        return x, y, mask
