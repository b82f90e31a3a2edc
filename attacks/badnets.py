"""BadNets: a fixed pixel pattern stamped on the image (Gu, Dolan-Gavitt, Garg, "BadNets: Identifying
Vulnerabilities in the Machine Learning Model Supply Chain", 2017, https://arxiv.org/abs/1708.06733).

Patterns:
- `square`: a `size` x `size` patch of `value` on every channel.
- `checkerboard`: the same patch with alternating `value` / 0 pixels.
- `sdfc12`: the SDFC code's trigger, 12 pixels in rows {0, 2} x columns {0, 1, 2, 4, 5, 6} of
  channel 0 (`Attack/backdoor/utils.py` in WenkeHuang/SDFC). The SDFC code writes 1 into these pixels
  AFTER normalisation; thorn stamps in pixel space BEFORE normalisation (value 1 = white), as every
  other trigger here, so the preset keeps the positions but not the post-normalisation value.

`position` places square/checkerboard patches in a corner, one pixel from the border, or at an
explicit [row, col] of the patch's top-left pixel.
"""

from __future__ import annotations

import torch

from attacks.base import TriggerPoison

PATTERNS = ("square", "checkerboard", "sdfc12")
CORNERS = ("bottom_right", "top_left", "top_right", "bottom_left")
SDFC12_ROWS = (0, 2)
SDFC12_COLS = (0, 1, 2, 4, 5, 6)


class BadNets(TriggerPoison):
    def __init__(self, target_label: int = 2, poison_ratio: float = 0.5, pattern: str = "square",
                 size: int = 3, position="bottom_right", value: float = 1.0) -> None:
        super().__init__(target_label, poison_ratio)
        if pattern not in PATTERNS:
            raise ValueError(f"attack.poison.pattern={pattern!r} is unknown; allowed: {', '.join(PATTERNS)}")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"attack.poison.value={value} must be in [0, 1] (pixel space)")
        if isinstance(position, str) and position not in CORNERS:
            raise ValueError(f"attack.poison.position={position!r}; allowed: {', '.join(CORNERS)} or [row, col]")
        self.pattern, self.size, self.value = pattern, int(size), float(value)
        self.position = position if isinstance(position, str) else tuple(int(v) for v in position)

    def _top_left(self, height: int, width: int) -> tuple[int, int]:
        if not isinstance(self.position, str):
            return self.position
        margin = 1
        row = margin if self.position.startswith("top") else height - margin - self.size
        col = margin if self.position.endswith("left") else width - margin - self.size
        return row, col

    def trigger(self, channels: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, values), both (C, H, W): the pixels the trigger owns and what it writes there."""
        mask = torch.zeros(channels, height, width, dtype=torch.bool)
        values = torch.zeros(channels, height, width)
        if self.pattern == "sdfc12":
            for r in SDFC12_ROWS:
                for c in SDFC12_COLS:
                    mask[0, r, c] = True
            values[mask] = self.value
            return mask, values
        row, col = self._top_left(height, width)
        if row < 0 or col < 0 or row + self.size > height or col + self.size > width:
            raise ValueError(f"a {self.size}x{self.size} trigger at {(row, col)} does not fit {height}x{width} images")
        mask[:, row:row + self.size, col:col + self.size] = True
        patch = torch.full((self.size, self.size), self.value)
        if self.pattern == "checkerboard":
            parity = (torch.arange(self.size)[:, None] + torch.arange(self.size)[None, :]) % 2
            patch = torch.where(parity == 0, patch, torch.zeros_like(patch))
        values[:, row:row + self.size, col:col + self.size] = patch
        return mask, values

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        mask, values = self.trigger(*x.shape[1:])
        mask, values = mask.to(x.device), values.to(x.device, x.dtype)
        return torch.where(mask[None], values[None], x)
