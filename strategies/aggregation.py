"""Pure aggregation math shared by every defense: state dicts <-> one (clients x parameters) matrix.

Defenses reason about flattened update vectors (distances, norms, clustering). Two rules hold
everywhere:
- vectors for distances/norms/clustering hold trainable parameters only: BatchNorm running statistics
  and `num_batches_tracked` are not evidence about a client and would dominate distances;
- the aggregate still covers the full state dict: floating buffers are averaged with the same
  weights, integer buffers (`num_batches_tracked`) take the max (a weighted mean of counters means
  nothing).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

StateDict = dict[str, torch.Tensor]


def float_keys(state: StateDict) -> list[str]:
    return [k for k, v in state.items() if torch.is_floating_point(v)]


def flatten_states(states: Sequence[StateDict], keys: Sequence[str]) -> torch.Tensor:
    """Stack the `keys` of every state into a float32 matrix of shape (clients, parameters)."""
    return torch.stack([torch.cat([s[k].reshape(-1).to(torch.float32) for k in keys]) for s in states])


def unflatten_vector(vector: torch.Tensor, template: StateDict, keys: Sequence[str]) -> StateDict:
    """Inverse of one row of `flatten_states`, with the template's shapes and dtypes."""
    out, offset = {}, 0
    for k in keys:
        numel = template[k].numel()
        out[k] = vector[offset:offset + numel].reshape(template[k].shape).to(template[k].dtype)
        offset += numel
    return out


def normalise_weights(weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.ndim != 1 or len(w) == 0 or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"aggregation weights must be non-negative with a positive sum, got {w.tolist()}")
    return w / w.sum()


def weighted_average_states(states: Sequence[StateDict], weights: Sequence[float] | torch.Tensor) -> StateDict:
    """Weighted mean of full state dicts (floating entries); integer buffers take the max over clients."""
    w = normalise_weights(weights)
    template = states[0]
    keys = float_keys(template)
    matrix = flatten_states(states, keys).to(torch.float64)
    averaged = unflatten_vector(w @ matrix, template, keys)
    for k in template:
        if k not in averaged:  # integer buffers such as num_batches_tracked
            averaged[k] = torch.stack([s[k] for s in states]).amax(0)
    return {k: averaged[k] for k in template}  # keep the state dict's key order
