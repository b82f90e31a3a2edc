"""SIG: a sinusoidal signal added to the image (Barni, Kallas, Tondi, "A new Backdoor Attack in CNNs by
training set corruption without label poisoning", 2019, https://arxiv.org/abs/1902.11237).

The trigger is the paper's horizontal sinusoid v(i, j) = delta * sin(2 * pi * j * f / W),
j the column and W the image width, added to every channel and clipped to [0, 1]. The paper states
delta on the 0..255 scale (delta = 20, f = 6); thorn works in [0, 1] pixel space, so `delta` is a
fraction of the pixel range (default 20/255). The frequency should stay well below W / 2: the signal is
sampled once per column, so e.g. f = W gives sin(2 * pi * j) = 0 on every column (no trigger at all).

The original attack is clean-label: only training samples that already belong to the target class
are stamped, and no label is changed. With `clean_label: true`, `poison_batch` does exactly that:
it stamps round(poison_ratio * #target-class samples in the batch) of them and leaves every label.
The default (`clean_label: false`) is a dirty-label use of the same trigger, round(poison_ratio * N)
random samples stamped and relabelled, since that is how most federated-learning papers use SIG.
"""

from __future__ import annotations

import math

import torch

from attacks.base import TriggerPoison


class SIG(TriggerPoison):
    def __init__(self, target_label: int = 2, poison_ratio: float = 0.5, delta: float = 20 / 255,
                 frequency: float = 6, clean_label: bool = False) -> None:
        super().__init__(target_label, poison_ratio)
        if not 0.0 < float(delta) <= 1.0:
            raise ValueError(f"attack.poison.delta={delta} must be in (0, 1] (a fraction of the pixel range)")
        if not float(frequency) > 0.0:
            raise ValueError(f"attack.poison.frequency={frequency} must be > 0")
        self.delta, self.frequency, self.clean_label = float(delta), float(frequency), bool(clean_label)

    def signal(self, width: int) -> torch.Tensor:
        """The (W,) row profile delta * sin(2 pi j f / W), the same on every row and channel."""
        columns = torch.arange(width, dtype=torch.float64)
        return (self.delta * torch.sin(2 * math.pi * columns * self.frequency / width)).float()

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        signal = self.signal(x.shape[-1]).to(x.device, x.dtype)
        return (x + signal).clamp(0.0, 1.0)

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.clean_label:
            return super().poison_batch(x, y, generator)
        mask = torch.zeros(x.shape[0], dtype=torch.bool)
        candidates = torch.nonzero(y.cpu() == self.target_label).flatten()
        count = round(self.poison_ratio * len(candidates))
        if count == 0:
            return x, y, mask
        mask[candidates[torch.randperm(len(candidates), generator=generator)[:count]]] = True
        x = x.clone()
        x[mask] = self.apply_trigger(x[mask])
        return x, y, mask
