"""Neurotoxin (Zhang, Panda, Song, Yang, Mahoney, Gonzalez, Ramchandran, Mittal, "Neurotoxin: Durable
Backdoors in Federated Learning", ICML 2022, https://arxiv.org/abs/2206.10341).

Idea: benign clients keep changing the coordinates that the benign objective moves most; a backdoor
written into those coordinates is overwritten quickly. The attacker therefore approximates the
benign update by the last change of the global model it observed, freezes the top-k% coordinates of
that change by magnitude, and trains the backdoor only in the remaining coordinates.

Per round, in `before_training`:
- if `memory["previous_global"]` exists (the global model this client saw the previous time the hook
  ran), delta = global_now - previous_global, and the mask keeps the coordinates OUTSIDE the
  round(topk_ratio * d) largest |delta| (d = all trainable floating coordinates of the model, one
  ranking for the whole model, not per layer);
- otherwise (the first round this client attacks) there is no mask and the client trains normally;
- global_now is stored as `memory["previous_global"]`: ONE flattened float32 CPU tensor, nothing else,
  so the ClientApp can keep the memory as an ArrayRecord across rounds.

What thorn infers / chooses:
- The paper projects the gradient onto the allowed coordinates before each step. thorn's hook runs
  after the optimizer step, so frozen coordinates are reset to the GLOBAL model's values after every
  step. Training starts from the global model, so frozen coordinates never move, as with a masked
  gradient. For a per-coordinate optimizer such as thorn's SGD (momentum, weight decay) the free
  coordinates also follow the same trajectory as with a masked gradient: each coordinate's step
  depends only on its own gradient and momentum, and the full parameter vector (frozen coordinates
  at their global values) is the same either way. The mask is applied once more to the uploaded
  state in `after_training`.
- "Trainable floating entries" are the floating state-dict entries that are not BatchNorm buffers
  (running_mean / running_var / num_batches_tracked), in state-dict order. Buffers are neither ranked
  nor frozen.
- If the client skipped rounds, delta spans every round since it last ran (the only global models it
  saw). If the stored vector's length does not match the model (the model changed), it is discarded
  and the round trains without a mask.
- Only the coordinate mask is implemented here; any norm bound is a separate choice of the experiment.
"""

from __future__ import annotations

import torch
from torch import nn

from attacks.base import ModelPoison, StateDict
from attacks.pgd import parameter_keys

MEMORY_KEY = "previous_global"


def neurotoxin_mask(delta_flat: torch.Tensor, topk_ratio: float) -> torch.Tensor:
    """Boolean mask over `delta_flat` (d,): True = the coordinate may change (outside the top-k of |delta|).

    Exactly round(topk_ratio * d) coordinates, those of largest |delta|, are False (ties broken by
    `torch.topk`), so the kept fraction is 1 - round(topk_ratio * d) / d."""
    if not 0.0 <= float(topk_ratio) <= 1.0:
        raise ValueError(f"topk_ratio={topk_ratio} must be in [0, 1]")
    flat = delta_flat.reshape(-1)
    d = flat.numel()
    k = round(float(topk_ratio) * d)
    mask = torch.ones(d, dtype=torch.bool, device=flat.device)
    if k > 0:
        frozen = torch.topk(flat.abs(), k, sorted=False).indices
        mask[frozen] = False
    return mask


def flatten_parameters(state: StateDict, keys: list[str]) -> torch.Tensor:
    """The `keys` entries of `state` as one float32 CPU vector."""
    if not keys:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat([state[k].detach().reshape(-1).to(device="cpu", dtype=torch.float32) for k in keys])


class Neurotoxin(ModelPoison):
    """Freeze the `topk_ratio` share of coordinates the last global update changed most."""

    def __init__(self, topk_ratio: float = 0.1) -> None:
        if not 0.0 <= float(topk_ratio) <= 1.0:
            raise ValueError(f"attack.model_poison.topk_ratio={topk_ratio} must be in [0, 1]")
        self.topk_ratio = float(topk_ratio)
        self.masks: dict[str, torch.Tensor] | None = None  # per parameter name, True = may change; None = no mask
        self._device_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def before_training(self, global_state: StateDict, memory: dict[str, torch.Tensor]) -> None:
        keys = parameter_keys(global_state)
        now = flatten_parameters(global_state, keys)
        previous = memory.get(MEMORY_KEY)
        self.masks = None
        self._device_cache = {}
        if previous is not None and previous.numel() == now.numel():
            flat_mask = neurotoxin_mask(now - previous.reshape(-1).to(torch.float32), self.topk_ratio)
            self.masks, offset = {}, 0
            for k in keys:
                n = global_state[k].numel()
                self.masks[k] = flat_mask[offset:offset + n].reshape(global_state[k].shape)
                offset += n
        memory[MEMORY_KEY] = now

    def _mask_and_global(self, name: str, p: torch.Tensor,
                         global_state: StateDict) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._device_cache.get(name)
        if cached is None or cached[0].device != p.device or cached[1].dtype != p.dtype:
            cached = (self.masks[name].to(p.device), global_state[name].detach().to(device=p.device, dtype=p.dtype))
            self._device_cache[name] = cached
        return cached

    @torch.no_grad()
    def after_step(self, model: nn.Module, global_state: StateDict) -> None:
        if self.masks is None:
            return
        for name, p in model.named_parameters():
            if name in self.masks:
                mask, g = self._mask_and_global(name, p, global_state)
                p.copy_(torch.where(mask, p, g))

    @torch.no_grad()
    def after_training(self, global_state: StateDict, local_state: StateDict) -> StateDict:
        if self.masks is None:
            return local_state
        out = dict(local_state)
        for name, mask in self.masks.items():
            if name in out:
                value = out[name]
                g = global_state[name].to(device=value.device, dtype=value.dtype)
                out[name] = torch.where(mask.to(value.device), value, g)
        return out

    def __repr__(self) -> str:
        return f"Neurotoxin(topk_ratio={self.topk_ratio})"
