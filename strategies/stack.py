"""The client models of one round in one preallocated (clients x parameters) float32 matrix.

Why: with 100 clients of an 11 M-parameter model, every copy of the round's models costs 4.4 GB. Decoding
each reply into its own state dict, then stacking those into a matrix for distances, then subtracting the
global model, held three such copies at once next to the replies themselves (which Flower keeps until the
strategy returns), and ran out of 24 GiB. Here each reply is decoded straight from its serialised bytes into
one row of a matrix allocated once per round; the `ClientUpdate.state` tensors a defense sees are views into
that row, and rules that work on flattened vectors (Krum, median, trimmed mean, Bulyan, the weighted mean)
read the matrix itself, without another copy (`strategies.base.update_vectors`).

Layout of a row: the float32 entries of the model, trainable parameters first (in the order the strategy uses
for vectors), then the other float32 entries (BatchNorm running statistics). Entries of other dtypes
(`num_batches_tracked`, half-precision weights) stay ordinary tensors outside the matrix.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch

from strategies.aggregation import StateDict


def array_view(data: bytes) -> np.ndarray:
    """A read-only NumPy view of one Flower `Array`'s serialised bytes (the .npy format), without copying.

    `Array.numpy()` reads through `np.load`, which copies the data once more; for 4.4 GB of replies that
    copy is the difference between fitting in memory and not. Object dtypes (pickles) are refused."""
    buffer = io.BytesIO(data)
    version = np.lib.format.read_magic(buffer)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(buffer)
    else:
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(buffer)
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    count = int(np.prod(shape, dtype=np.int64))
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=buffer.tell())
    return flat.reshape(shape, order="F" if fortran_order else "C")


class ReplyStack:
    """Rows for up to `capacity` client models shaped like `template`; `used` rows hold accepted replies."""

    def __init__(self, template: StateDict, leading_keys: Sequence[str], capacity: int) -> None:
        stacked = [k for k, v in template.items() if v.dtype == torch.float32]
        leading = [k for k in leading_keys if k in set(stacked)]
        self.keys = leading + [k for k in stacked if k not in set(leading)]
        self.leading_keys = list(leading_keys)
        self.shapes = {k: tuple(template[k].shape) for k in self.keys}
        self.offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for k in self.keys:
            numel = template[k].numel()
            self.offsets[k] = (offset, offset + numel)
            offset += numel
        self.width = offset
        # the leading keys form a prefix of every row only if all of them are float32
        self.leading_width = (sum(template[k].numel() for k in leading)
                              if len(leading) == len(self.leading_keys) else None)
        self.matrix = torch.empty((capacity, self.width), dtype=torch.float32)
        self.reference = torch.empty(self.width, dtype=torch.float32)  # the global model, same layout
        for k in self.keys:
            start, end = self.offsets[k]
            self.reference[start:end] = template[k].reshape(-1)
        self.template = template  # the global model the reference row was filled from
        self.used = 0
        self._scratch: torch.Tensor | None = None

    def squared_distance_to_reference(self, row: int, width: int, chunk: int = 1 << 20) -> float:
        """|matrix[row, :width] - reference[:width]|², float64 sums of float32 chunks computed in one
        reused buffer (a fresh 44 MB difference per reply would be mapped and zero-filled each time)."""
        if self._scratch is None:
            self._scratch = torch.empty(chunk, dtype=torch.float32)
        total = 0.0
        for start in range(0, width, chunk):
            end = min(start + chunk, width)
            diff = torch.sub(self.matrix[row, start:end], self.reference[start:end], out=self._scratch[:end - start])
            total += float(torch.dot(diff, diff).double())
        return total

    def holds(self, key: str) -> bool:
        return key in self.offsets

    def row_views(self, row: int) -> StateDict:
        """key -> a view of row `row` shaped like the template's entry (writes go into the matrix)."""
        data = self.matrix[row]
        return {k: data[start:end].view(self.shapes[k]) for k, (start, end) in self.offsets.items()}

    def vectors_for(self, keys: Sequence[str]) -> int | None:
        """The width of the row prefix holding exactly `keys`, or None when they are not that prefix."""
        if self.leading_width is not None and list(keys) == self.leading_keys:
            return self.leading_width
        return None

    def reorder(self, order: Sequence[int]) -> None:
        """Permute the used rows in place so that row i holds what row order[i] held (one spare row,
        no copy of the matrix)."""
        if sorted(order) != list(range(len(order))):
            raise ValueError(f"not a permutation of 0..{len(order) - 1}: {list(order)}")
        spare = torch.empty(self.width, dtype=torch.float32)
        done = [False] * len(order)
        for start in range(len(order)):
            if done[start]:
                continue
            if order[start] == start:
                done[start] = True
                continue
            spare.copy_(self.matrix[start])
            row = start
            while True:  # follow the cycle: each row is read before it is overwritten
                done[row] = True
                source = order[row]
                if source == start:
                    self.matrix[row].copy_(spare)
                    break
                self.matrix[row].copy_(self.matrix[source])
                row = source

    def unflatten(self, vector: torch.Tensor) -> StateDict:
        """A (width,) vector -> fresh tensors for every stacked key, shaped like the template."""
        return {k: vector[start:end].reshape(self.shapes[k]).clone() for k, (start, end) in self.offsets.items()}
