"""Norm-constrained training (PGD) and constrain-and-scale.

Papers:
- Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?", arXiv 2019,
  https://arxiv.org/abs/1911.07963: norm-bounded aggregation as a defense, and attackers that stay
  inside the bound.
- Wang, Sreenivasan, Rajput, Vishwakarma, Agarwal, Sohn, Lee, Papailiopoulos, "Attack of the Tails:
  Yes, You Really Can Backdoor Federated Learning", NeurIPS 2020, https://arxiv.org/abs/2007.05084:
  projected gradient descent (PGD) onto an L2 ball around the global model during local training,
  optionally followed by model-replacement scaling.

The malicious client trains normally; every `project_every` optimizer steps the trainable parameters
w are projected onto {w : ||w - G||_2 <= epsilon}, G the global model of the round:

    w <- G + (w - G) * min(1, epsilon / ||w - G||_2).

The norm is over the concatenation of ALL trainable parameters (one ball for the whole model, not one
per layer). After training the upload is projected once more (the last steps may not fall on a
projection step) and then optionally scaled: upload = G + scale * (L_projected - G). With scale = 1
(default) this is plain PGD; scale > 1 is constrain-and-scale.

What thorn infers where the papers are silent:
- Buffers are not parameters: BatchNorm running statistics are neither in the norm nor projected.
  In `after_training` the parameter entries are the floating entries of the global state whose names
  do not end in running_mean / running_var / num_batches_tracked.
- `scale` acts like `attacks.scaling.Scaling`: on every floating entry (running statistics
  included), so the uploaded parameter update has norm <= scale * epsilon; integer buffers
  (`num_batches_tracked`) pass through unchanged.
- The step counter restarts every round (in `before_training`).
"""

from __future__ import annotations

import torch
from torch import nn

from attacks.base import ModelPoison, StateDict

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def parameter_keys(state: StateDict) -> list[str]:
    """Floating entries of a state dict that are parameters, i.e. not BatchNorm buffers (state order)."""
    return [k for k, v in state.items() if torch.is_floating_point(v) and not k.endswith(BUFFER_SUFFIXES)]


def project_l2_ball(current: list[torch.Tensor], center: list[torch.Tensor], epsilon: float) -> list[torch.Tensor]:
    """Project the concatenation of `current` onto the L2 ball of radius `epsilon` around `center`.

    Returns new tensors (the inputs themselves when already inside the ball)."""
    if not current:
        return current
    diffs = [c - g for c, g in zip(current, center, strict=True)]
    norm = torch.sqrt(sum((d.to(torch.float64) ** 2).sum() for d in diffs))
    if float(norm) <= epsilon:
        return current
    factor = epsilon / float(norm)
    return [g + d * factor for g, d in zip(center, diffs, strict=True)]


class PGDConstrain(ModelPoison):
    """Project the trainable parameters onto the L2 ball of radius `epsilon` around the global model
    every `project_every` steps and after training; then upload G + scale * (L - G)."""

    def __init__(self, epsilon: float = 2.0, project_every: int = 1, scale: float = 1.0) -> None:
        if float(epsilon) <= 0:
            raise ValueError(f"attack.model_poison.epsilon={epsilon} must be > 0")
        if int(project_every) < 1:
            raise ValueError(f"attack.model_poison.project_every={project_every} must be >= 1")
        if float(scale) <= 0:
            raise ValueError(f"attack.model_poison.scale={scale} must be > 0")
        self.epsilon = float(epsilon)
        self.project_every = int(project_every)
        self.scale = float(scale)
        self.steps = 0
        self._center: dict[str, torch.Tensor] = {}  # global parameters on the model's device, per round
        self._center_source: int | None = None

    def before_training(self, global_state: StateDict, memory: dict[str, torch.Tensor]) -> None:
        self.steps = 0
        self._center, self._center_source = {}, None

    def _global_param(self, name: str, p: torch.Tensor, global_state: StateDict) -> torch.Tensor:
        if self._center_source != id(global_state):
            self._center, self._center_source = {}, id(global_state)
        g = self._center.get(name)
        if g is None or g.device != p.device or g.dtype != p.dtype:
            g = global_state[name].detach().to(device=p.device, dtype=p.dtype)
            self._center[name] = g
        return g

    @torch.no_grad()
    def project(self, model: nn.Module, global_state: StateDict) -> None:
        """Project `model`'s trainable parameters in place onto the ball around `global_state`."""
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        current = [p for _, p in params]
        center = [self._global_param(n, p, global_state) for n, p in params]
        projected = project_l2_ball(current, center, self.epsilon)
        if projected is current:
            return
        for p, new in zip(current, projected, strict=True):
            p.copy_(new)

    def after_step(self, model: nn.Module, global_state: StateDict) -> None:
        self.steps += 1
        if self.steps % self.project_every == 0:
            self.project(model, global_state)

    @torch.no_grad()
    def after_training(self, global_state: StateDict, local_state: StateDict) -> StateDict:
        keys = [k for k in parameter_keys(global_state) if k in local_state]
        current = [local_state[k] for k in keys]
        center = [global_state[k].to(device=local_state[k].device, dtype=local_state[k].dtype) for k in keys]
        out = dict(local_state)
        out.update(zip(keys, project_l2_ball(current, center, self.epsilon), strict=True))
        if self.scale != 1.0:
            for key, value in out.items():
                if torch.is_floating_point(value):
                    g = global_state[key].to(device=value.device, dtype=value.dtype)
                    out[key] = g + self.scale * (value - g)
        return out

    def __repr__(self) -> str:
        return f"PGDConstrain(epsilon={self.epsilon}, project_every={self.project_every}, scale={self.scale})"
