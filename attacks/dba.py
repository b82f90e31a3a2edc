"""DBA: a global trigger split into local parts, one per attacker (Xie, Huang, Chen, Li, "DBA:
Distributed Backdoor Attacks against Federated Learning", ICLR 2020,
https://openreview.net/forum?id=rkgyS0VFvr).

The global trigger is the union of `num_parts` local patterns. The default layout follows the paper's
MNIST/CIFAR setting: horizontal bars `size` pixels long and 1 pixel high, two per row, in a 2 x 2
layout near the top-left corner (every channel is set to `value`):

- part 0: row `row`,       columns [col, col + size)
- part 1: row `row`,       columns [col + size + gap, col + 2 * size + gap)
- part 2: row `row + gap`, columns as part 0
- part 3: row `row + gap`, columns as part 1

Inferred: with more than 4 parts, the layout continues in the same way (part p on row
row + (p // 2) * gap, column block p % 2). Malicious client number i (0, 1, ...) trains with part
i % num_parts only (`for_attacker`); the ASR is measured with the global trigger (`apply_trigger`).
"""

from __future__ import annotations

import torch

from attacks.base import TriggerPoison


class DBA(TriggerPoison):
    def __init__(self, target_label: int = 2, poison_ratio: float = 0.5, num_parts: int = 4, size: int = 4,
                 gap: int = 2, row: int = 1, col: int = 1, value: float = 1.0) -> None:
        super().__init__(target_label, poison_ratio)
        if int(num_parts) < 1:
            raise ValueError(f"attack.poison.num_parts={num_parts} must be an integer >= 1")
        if int(size) < 1:
            raise ValueError(f"attack.poison.size={size} must be an integer >= 1")
        if int(gap) < 1:
            raise ValueError(f"attack.poison.gap={gap} must be an integer >= 1 (the parts must not overlap)")
        if int(row) < 0:
            raise ValueError(f"attack.poison.row={row} must be >= 0")
        if int(col) < 0:
            raise ValueError(f"attack.poison.col={col} must be >= 0")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"attack.poison.value={value} must be in [0, 1] (pixel space)")
        self.num_parts, self.size, self.gap = int(num_parts), int(size), int(gap)
        self.row, self.col, self.value = int(row), int(col), float(value)

    def part_position(self, part: int) -> tuple[int, int]:
        """(row, first column) of the bar of local part `part`."""
        if not 0 <= part < self.num_parts:
            raise ValueError(f"part={part} is not in 0..{self.num_parts - 1}")
        return self.row + (part // 2) * self.gap, self.col + (part % 2) * (self.size + self.gap)

    def part_mask(self, part: int, channels: int, height: int, width: int) -> torch.Tensor:
        """(C, H, W) bool: the pixels of local part `part`."""
        r, c = self.part_position(part)
        if r >= height or c + self.size > width:
            raise ValueError(f"DBA part {part} at row {r}, columns [{c}, {c + self.size}) does not fit "
                             f"{height}x{width} images")
        mask = torch.zeros(channels, height, width, dtype=torch.bool)
        mask[:, r, c:c + self.size] = True
        return mask

    def global_mask(self, channels: int, height: int, width: int) -> torch.Tensor:
        """(C, H, W) bool: the union of all parts."""
        mask = torch.zeros(channels, height, width, dtype=torch.bool)
        for part in range(self.num_parts):
            mask |= self.part_mask(part, channels, height, width)
        return mask

    def stamp(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask.to(x.device)[None], torch.full_like(x, self.value), x)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self.stamp(x, self.global_mask(*x.shape[1:]))

    def for_attacker(self, attacker_index: int) -> TriggerPoison:
        return DBAPart(self, int(attacker_index) % self.num_parts)


class DBAPart(TriggerPoison):
    """The poison of one DBA attacker: only local part `part` of the parent's global trigger."""

    def __init__(self, parent: DBA, part: int) -> None:
        super().__init__(parent.target_label, parent.poison_ratio)
        parent.part_position(part)  # validates the index
        self.parent, self.part = parent, int(part)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self.parent.stamp(x, self.parent.part_mask(self.part, *x.shape[1:]))
