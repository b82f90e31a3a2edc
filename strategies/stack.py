"""The client models of one round as the rows of one (clients x parameters) float32 matrix, without a copy.

Why: with 100 clients of an 11 M-parameter model every copy of the round's models costs 4.4 GB, and writing
4.4 GB into freshly allocated memory took longer than most rules' arithmetic (about 2 s of page faults on this
project's 2-core machine). Flower keeps the replies alive until the strategy returns, so their serialised bytes
already hold every model: a row here is the list of zero-copy views of one reply's float32 arrays
(`array_view`). Rules read the matrix through column blocks (`aggregation.row_block`): a block of the rows is
gathered from the views into a buffer reused per thread (100 clients x 262 144 columns = 100 MB), the only
copy ever made, and one that stays in memory already mapped.

Layout of a row: the float32 entries of the model, trainable parameters first (in the order the strategy uses
for vectors), then the other float32 entries (BatchNorm running statistics). Entries of other dtypes
(`num_batches_tracked`, half-precision weights) stay ordinary tensors outside the matrix.

READ-ONLY: the rows, and the `ClientUpdate.state` tensors they are made of, are the replies' own bytes. A
defense that wants to change a client's model works on a copy (`tensor.clone()`, `StackColumns.dense()`).
"""

from __future__ import annotations

import bisect
import io
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from strategies.aggregation import COLUMN_BLOCK, StateDict

NPY_MAGIC = b"\x93NUMPY"
_HEADER_CACHE: dict[bytes, tuple[tuple[int, ...], bool, np.dtype, int, int]] = {}
_HEADER_CACHE_SIZE = 4096


def _parse_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int, int]:
    """(shape, Fortran order, dtype, offset of the data, number of entries) of a .npy payload."""
    buffer = io.BytesIO(data)
    version = np.lib.format.read_magic(buffer)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(buffer)
    else:
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(buffer)
    return shape, fortran_order, dtype, buffer.tell(), int(np.prod(shape, dtype=np.int64))


def array_view(data: bytes) -> np.ndarray:
    """A read-only NumPy view of one Flower `Array`'s serialised bytes (the .npy format), without copying.

    `Array.numpy()` reads through `np.load`, which copies the data once more; for 4.4 GB of replies that copy
    is the difference between fitting in memory and not. Object dtypes (pickles) are refused. Parsed headers
    are cached by their bytes: every client sends the same ~120 headers, and parsing one (a Python literal)
    costs more than viewing the array."""
    header_end = None
    if len(data) >= 10 and data[:6] == NPY_MAGIC:
        if data[6] == 1:
            header_end = 10 + int.from_bytes(data[8:10], "little")
        elif data[6] in (2, 3) and len(data) >= 12:
            header_end = 12 + int.from_bytes(data[8:12], "little")
    key = data[:header_end] if header_end is not None else None
    parsed = _HEADER_CACHE.get(key) if key is not None else None
    if parsed is None:
        parsed = _parse_header(data)
        if key is not None and len(_HEADER_CACHE) < _HEADER_CACHE_SIZE:
            _HEADER_CACHE[key] = parsed
    shape, fortran_order, dtype, offset, count = parsed
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C")


class ReplyStack:
    """The rows of one round: each the flat float32 entries of one client model, in `keys` order. Every reply
    that passed the structural checks is a row, in the strategy's sorted order; the NaN/norm check then runs
    over the rows (`summarise`), and a reply it rejects keeps its row, which no update refers to."""

    def __init__(self, template: StateDict, leading_keys: Sequence[str]) -> None:
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
        self._starts = [self.offsets[k][0] for k in self.keys]  # for bisect: which key holds column c
        # the leading keys form a prefix of every row only if all of them are float32
        self.leading_width = (sum(template[k].numel() for k in leading)
                              if len(leading) == len(self.leading_keys) else None)
        # the global model in the same layout (an offset for the rules' column blocks)
        self.reference = (torch.cat([template[k].reshape(-1) for k in self.keys]) if self.keys
                          else torch.empty(0, dtype=torch.float32))
        self.template = template  # the global model the reference row was made from
        self.rows: list[list[np.ndarray]] = []
        # the Gram matrix of every row's first `gram_width` columns minus the reference, when the round's
        # validation pass computed it (for strategies that need pairwise distances: base.centred_gram)
        self.gram: torch.Tensor | None = None
        self.gram_width: int | None = None
        # Σ_i w_i (row_i - reference) over every column, with the per-row weights w (`summarise`)
        self.weighted_sum: torch.Tensor | None = None
        self.sum_weights: list[float] | None = None
        self._local = threading.local()  # per-thread gather buffer (columnwise runs blocks in threads)

    @property
    def used(self) -> int:
        return len(self.rows)

    def append(self, state: StateDict) -> int:
        """Add `state` (a full state dict whose float32 entries are C-contiguous, e.g. zero-copy views of
        a reply) as the next row; returns its index. Nothing is copied."""
        row = []
        for k in self.keys:
            values = state[k].detach().numpy()  # shares memory (no copy): a view of the reply's bytes
            if values.size and not values.flags.c_contiguous:
                raise ValueError(f"{k!r} is not C-contiguous; decode it with strategies.base.decode_arrays")
            row.append(values.reshape(-1))
        self.rows.append(row)
        return len(self.rows) - 1

    def holds(self, key: str) -> bool:
        return key in self.offsets

    def vectors_for(self, keys: Sequence[str]) -> int | None:
        """The width of the row prefix holding exactly `keys`, or None when they are not that prefix."""
        if self.leading_width is not None and list(keys) == self.leading_keys:
            return self.leading_width
        return None

    def _segments(self, start: int, end: int) -> list[tuple[int, int, int, int]]:
        """Columns [start, end) as (key index, first, last entry of that key, position in the block)."""
        segments = []
        i = bisect.bisect_right(self._starts, start) - 1
        column = start
        while column < end and i < len(self.keys):
            key_start, key_end = self.offsets[self.keys[i]]
            last = min(end, key_end)
            if last > column:
                segments.append((i, column - key_start, last - key_start, column - start))
            column = last
            i += 1
        return segments

    def _buffer(self, rows: int, columns: int) -> torch.Tensor:
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or buffer.numel() < rows * columns:
            buffer = torch.empty(rows * columns, dtype=torch.float32)
            self._local.buffer = buffer
        return buffer[:rows * columns].view(rows, columns)

    def gather(self, rows: Sequence[int], start: int, end: int, offset: torch.Tensor | None = None,
               out: torch.Tensor | None = None, pool: ThreadPoolExecutor | None = None) -> torch.Tensor:
        """(len(rows), end - start) float32: columns [start, end) of those rows, minus offset[start:end] when
        given (a float32 (width,) vector, subtracted while copying). Written into `out`, else into this
        thread's buffer, which its next call overwrites: use the result, or copy it, before gathering again.
        With a `pool` of two threads, each copies half of the rows (NumPy copies release the GIL)."""
        end = min(end, self.width)
        if out is None:
            out = self._buffer(len(rows), max(end - start, 0))
        if pool is not None and len(rows) > 1:
            half = len(rows) // 2
            parts = [pool.submit(self.gather, rows[:half], start, end, offset, out[:half]),
                     pool.submit(self.gather, rows[half:], start, end, offset, out[half:])]
            for part in parts:
                part.result()
            return out
        target = out.numpy()
        segments = self._segments(start, end)
        shift = offset[start:end].numpy() if offset is not None else None
        for i, r in enumerate(rows):
            arrays = self.rows[r]
            for key_index, first, last, at in segments:
                source = arrays[key_index][first:last]
                if shift is None:
                    target[i, at:at + last - first] = source
                else:
                    np.subtract(source, shift[at:at + last - first], out=target[i, at:at + last - first])
        return out

    def summarise(self, width: int, weights: Sequence[float] | None = None, gram: bool = False) -> list[float]:
        """One pass over every row, returning |row[:width] - reference[:width]|² per row (the validation
        norms; non-finite for a row holding NaN/Inf) and keeping what rules would otherwise need another pass
        for:
        - with `gram`: `self.gram`, the (used, used) float64 Gram matrix of the rows' first `width` columns
          minus the reference (Krum's distances; its diagonal is the returned norms);
        - with `weights` (one per row): `self.weighted_sum`, Σ_i weights[i] (row_i - reference) over every
          column, float64 (FedAvg's numerator: base.example_mean).
        Float32 products within a column block (matrix products on blocks gathered minus the reference, which
        keeps the numbers small), float64 sums across blocks."""
        rows = list(range(self.used))
        squares = torch.zeros(len(rows), dtype=torch.float64)
        product = torch.zeros((len(rows), len(rows)), dtype=torch.float64) if gram else None
        w = torch.tensor(list(weights), dtype=torch.float32) if weights is not None else None
        total = torch.empty(self.width, dtype=torch.float64) if w is not None else None
        ends = [width, self.width] if w is not None else [width]
        start = 0
        pool = ThreadPoolExecutor(max_workers=2) if torch.get_num_threads() > 1 else None
        for end_of_part in ends:  # blocks split at `width`: the norms and the Gram cover [0, width) only
            while start < end_of_part:
                end = min(start + COLUMN_BLOCK, end_of_part)
                block = self.gather(rows, start, end, self.reference, pool=pool)
                if end <= width:
                    if product is not None:
                        product += (block @ block.T).to(torch.float64)
                    else:
                        squares += torch.linalg.vector_norm(block, dim=1).to(torch.float64).square()
                if total is not None:
                    total[start:end] = w @ block
                start = end
        if pool is not None:
            pool.shutdown()
        if product is not None:
            squares = product.diagonal().clone()
        self.gram, self.gram_width = product, (width if gram else None)
        self.weighted_sum, self.sum_weights = total, (list(weights) if weights is not None else None)
        return squares.tolist()

    def columns(self, rows: Sequence[int], width: int | None = None) -> StackColumns:
        return StackColumns(self, list(rows), self.width if width is None else width)

    def unflatten(self, vector: torch.Tensor) -> StateDict:
        """A (width,) vector -> float32 tensors for every stacked key, shaped like the template: views of the
        vector (of a float32 copy of it when it is not float32)."""
        values = vector.to(torch.float32)
        return {k: values[start:end].view(self.shapes[k]) for k, (start, end) in self.offsets.items()}


class StackColumns:
    """Rows `rows` of a ReplyStack over its first `width` columns: a read-only (len(rows), width) matrix that
    the column-block helpers of `strategies.aggregation` (`row_block`, `columnwise`, `row_statistics`,
    `weighted_row_sum`, `gram_matrix`, `select_columns`) read block by block. `dense()` copies the whole
    matrix, for a rule that cannot work block by block (none of thorn's needs it)."""

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, stack: ReplyStack, rows: list[int], width: int) -> None:
        self.stack, self.rows = stack, rows
        self.shape = (len(rows), width)

    def block(self, rows: torch.Tensor | Sequence[int] | None, start: int, end: int,
              offset: torch.Tensor | None = None) -> torch.Tensor:
        """Columns [start, end) of this matrix's rows `rows` (all when None), minus offset[start:end]; a
        per-thread buffer (ReplyStack.gather)."""
        picked = self.rows if rows is None else [self.rows[int(i)] for i in rows]
        if offset is not None and offset.dtype != torch.float32:
            return self.stack.gather(picked, start, min(end, self.shape[1])) - offset[start:end]
        return self.stack.gather(picked, start, min(end, self.shape[1]), offset)

    def dense(self) -> torch.Tensor:
        """A (len(rows), width) copy of the whole matrix."""
        out = torch.empty(self.shape, dtype=torch.float32)
        return self.stack.gather(self.rows, 0, self.shape[1], out=out)
