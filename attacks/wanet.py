"""WaNet: a fixed, smooth warp of the image as the trigger (Nguyen, Tran, "WaNet - Imperceptible
Warping-based Backdoor Attack", ICLR 2021, https://arxiv.org/abs/2102.10369).

The warping field follows the paper's construction:
1. a k x k control grid P of 2-D displacements, uniform in [-1, 1] (drawn from a torch.Generator seeded
   with `seed`), normalised by its mean absolute value;
2. P upsampled bicubically (align_corners=True) to H x W;
3. the sampling grid M = clamp(grid_rescale * (identity + s * P_up / H), -1, 1), with the identity grid
   in grid_sample's normalised coordinates ([-1, 1], x = column, y = row);
4. the warped image grid_sample(x, M, align_corners=True), bilinear, so values stay in [0, 1].

Inferred: the paper gives s as a strength in pixel terms; in normalised coordinates one pixel is about
2/H, so the field is divided by H (the height; the images here are square). `grid_rescale` (default 1)
scales the whole grid before clamping.

Noise mode (the paper's "noise" training mode): besides the round(poison_ratio * N) warped samples that
are relabelled to the target, round(noise_ratio * N) of the other samples (at most all of them) are
warped with M plus per-sample random noise uniform in (-1, 1) / H added to the grid, and keep their
TRUE label, so the model learns that other warps are not the trigger (a batch with no poisoned sample
gets no noise-mode samples either). The mask `poison_batch` returns
marks only the relabelled samples. `apply_trigger` (the ASR) uses M exactly, without noise.

The grids are built lazily for each (H, W) seen and cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attacks.base import TriggerPoison


def identity_grid(height: int, width: int) -> torch.Tensor:
    """(1, H, W, 2) grid that grid_sample(align_corners=True) maps to the unchanged image."""
    rows = torch.linspace(-1.0, 1.0, height)
    cols = torch.linspace(-1.0, 1.0, width)
    grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack((grid_x, grid_y), dim=-1)[None]


class WaNet(TriggerPoison):
    def __init__(self, target_label: int = 2, poison_ratio: float = 0.5, k: int = 4, s: float = 0.5,
                 grid_rescale: float = 1.0, noise_ratio: float = 0.2, seed: int = 0) -> None:
        super().__init__(target_label, poison_ratio)
        if int(k) < 2:
            raise ValueError(f"attack.poison.k={k} must be an integer >= 2 (the control grid is k x k)")
        if float(s) < 0.0:
            raise ValueError(f"attack.poison.s={s} must be >= 0")
        if float(grid_rescale) <= 0.0:
            raise ValueError(f"attack.poison.grid_rescale={grid_rescale} must be > 0")
        if not 0.0 <= float(noise_ratio) <= 1.0:
            raise ValueError(f"attack.poison.noise_ratio={noise_ratio} must be in [0, 1]")
        self.k, self.s, self.grid_rescale = int(k), float(s), float(grid_rescale)
        self.noise_ratio, self.seed = float(noise_ratio), int(seed)
        generator = torch.Generator().manual_seed(self.seed)
        control = torch.rand(1, 2, self.k, self.k, generator=generator) * 2 - 1
        self.control_grid = control / control.abs().mean()  # (1, 2, k, k): x and y displacements
        self._grids: dict[tuple[int, int], torch.Tensor] = {}

    def warp_grid(self, height: int, width: int) -> torch.Tensor:
        """The trigger's (1, H, W, 2) sampling grid M, in [-1, 1]."""
        key = (height, width)
        if key not in self._grids:
            field = F.interpolate(self.control_grid, size=(height, width), mode="bicubic", align_corners=True)
            field = field.permute(0, 2, 3, 1)  # (1, H, W, 2)
            grid = self.grid_rescale * (identity_grid(height, width) + self.s * field / height)
            self._grids[key] = grid.clamp(-1.0, 1.0)
        return self._grids[key]

    @staticmethod
    def _warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        grid = grid.to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True).clamp(0.0, 1.0)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self._warp(x, self.warp_grid(*x.shape[-2:]))

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        count = round(self.poison_ratio * n)
        noise_count = min(round(self.noise_ratio * n), n - count)
        mask = torch.zeros(n, dtype=torch.bool)
        if count == 0:  # no trigger in this batch: no noise-mode samples either
            return x, y, mask
        order = torch.randperm(n, generator=generator)
        mask[order[:count]] = True
        noise_mask = torch.zeros(n, dtype=torch.bool)
        noise_mask[order[count:count + noise_count]] = True
        x, y = x.clone(), y.clone()
        x[mask] = self.apply_trigger(x[mask])
        y[mask] = self.target_label
        if noise_count:
            noise = (torch.rand(noise_count, height, width, 2, generator=generator) * 2 - 1) / height
            grid = (self.warp_grid(height, width) + noise).clamp(-1.0, 1.0)
            x[noise_mask] = self._warp(x[noise_mask], grid)
        return x, y, mask
