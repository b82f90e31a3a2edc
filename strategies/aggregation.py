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
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

StateDict = dict[str, torch.Tensor]


def float_keys(state: StateDict) -> list[str]:
    return [k for k, v in state.items() if torch.is_floating_point(v)]


def flatten_states(states: Sequence[StateDict], keys: Sequence[str],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stack the `keys` of every state into a matrix of shape (clients, parameters).

    Filled in place (one allocation): concatenating rows and then stacking them held the matrix twice."""
    if not states:
        return torch.empty((0, 0), dtype=dtype)
    sizes = [states[0][k].numel() for k in keys]
    out = torch.empty((len(states), sum(sizes)), dtype=dtype, device=states[0][keys[0]].device if keys else "cpu")
    for i, s in enumerate(states):
        offset = 0
        for k, size in zip(keys, sizes, strict=True):
            out[i, offset:offset + size] = s[k].reshape(-1)
            offset += size
    return out


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


AVERAGE_CHUNK = 4_000_000  # parameters per float64 block in weighted_average_states


def weighted_average_states(states: Sequence[StateDict], weights: Sequence[float] | torch.Tensor) -> StateDict:
    """Weighted mean of full state dicts (floating entries); integer buffers take the max over clients."""
    w = normalise_weights(weights)
    template = states[0]
    keys = float_keys(template)
    # float64 matrix-vector products over groups of keys of at most ~4 M parameters: each parameter's
    # weighted sum is the same dot product over clients as with the whole matrix, but 100 clients of an
    # 11 M-parameter model need 3.2 GB at a time instead of 8.8 GB.
    parts, group, size = [], [], 0
    for k in keys:
        group.append(k)
        size += template[k].numel()
        if size >= AVERAGE_CHUNK or k == keys[-1]:
            parts.append(w.to(torch.float64) @ flatten_states(states, group, torch.float64))
            group, size = [], 0
    total = torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64)
    averaged = unflatten_vector(total, template, keys)
    for k in template:
        if k not in averaged:  # integer buffers such as num_batches_tracked
            averaged[k] = torch.stack([s[k] for s in states]).amax(0)
    return {k: averaged[k] for k in template}  # keep the state dict's key order


BN_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def default_trainable_keys(state: StateDict) -> list[str]:
    """Floating entries that are not BatchNorm statistics: the fallback when the model is unknown."""
    return [k for k, v in state.items() if torch.is_floating_point(v) and not k.endswith(BN_BUFFER_SUFFIXES)]


def apply_update(global_state: StateDict, update: torch.Tensor, keys: Sequence[str],
                 buffers_from: StateDict | None = None) -> StateDict:
    """global + update on `keys`; every other entry from `buffers_from` (e.g. a FedAvg of the kept
    clients, so BatchNorm statistics stay sensible), else from the global model."""
    new = unflatten_vector(flatten_states([global_state], keys)[0] + update, global_state, keys)
    source = buffers_from if buffers_from is not None else global_state
    return {k: new[k] if k in new else source[k] for k in global_state}


# ---- column blocks: rules over (clients x parameters) matrices without copying them whole ----------
COLUMN_BLOCK = 1 << 18  # columns per block: 100 clients x 262 144 float32 = 100 MB at a time


def row_block(matrix, rows: torch.Tensor | None, start: int, end: int,
              offset: torch.Tensor | None = None) -> torch.Tensor:
    """matrix[rows, start:end] - offset[start:end] (all rows when `rows` is None, no subtraction when
    `offset` is None). READ-ONLY: for a tensor without offset it is a view of the caller's matrix; for the
    round's stacked replies (`strategies.stack.StackColumns`) it is gathered into a per-thread buffer that
    the thread's next block overwrites."""
    if not isinstance(matrix, torch.Tensor):
        return matrix.block(rows, start, end, offset)
    block = matrix[:, start:end] if rows is None else matrix[rows, start:end]
    return block if offset is None else block - offset[start:end]


def columnwise(matrix: torch.Tensor, rule, rows: torch.Tensor | None = None, offset: torch.Tensor | None = None,
               block: int = COLUMN_BLOCK, threads: int = 1) -> torch.Tensor:
    """(d,) float32: `rule((k, c) block) -> (c,)` applied to column blocks of matrix[rows] - offset.

    A per-coordinate rule (median, trimmed mean, weighted mean) gives the same result on every block as
    on the whole matrix; blocks keep the working copies (row selection, subtraction, sorting buffers) at
    100 MB instead of one more copy of a 4.4 GB matrix. `threads` > 1 runs blocks concurrently: for rules
    built on NumPy selection (which releases the GIL but runs on one core), not for torch rules that
    already use every core."""
    width = matrix.shape[1]
    out = torch.empty(width, dtype=torch.float32, device=matrix.device)

    def one_block(start: int) -> None:
        end = min(start + block, width)
        out[start:end] = rule(row_block(matrix, rows, start, end, offset))

    starts = range(0, width, block)
    if threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(one_block, starts))  # list(): re-raise a block's exception here
    else:
        for start in starts:
            one_block(start)
    return out


def lanes(vectors: torch.Tensor) -> np.ndarray:
    """(n, c) tensor -> (c, n) C-contiguous NumPy array: one contiguous lane of n values per coordinate.
    Selecting along a contiguous lane is several times faster than along the strided first axis."""
    return np.ascontiguousarray(vectors.detach().cpu().numpy().T)


def lane_median(values: np.ndarray) -> np.ndarray:
    """(c, n) -> (c,): the median of each lane; for even n the mean of the two middle values.

    One selection (np.partition at n // 2) gives the upper middle value and leaves the n // 2 smaller
    values before it, whose max is the lower middle value: about 3x faster than np.median, which
    partitions at both middle positions."""
    n = values.shape[1]
    middle = n // 2
    part = np.partition(values, middle, axis=1)
    upper = part[:, middle]
    if n % 2:
        return upper.copy()
    return (part[:, :middle].max(axis=1) + upper) / 2


def lane_trimmed_mean(values: np.ndarray, k: int) -> np.ndarray:
    """(c, n) -> (c,): the mean of each lane without its k smallest and k largest values (k >= 1).
    Two single-position selections: the k smallest out first, then the k largest of the rest."""
    n = values.shape[1]
    rest = np.partition(values, k, axis=1)[:, k:]                    # drops the k smallest
    middle = np.partition(rest, n - 2 * k, axis=1)[:, :n - 2 * k]    # drops the k largest of the rest
    return middle.mean(axis=1)


def lane_closest_to_median_mean(values: np.ndarray, beta: int) -> np.ndarray:
    """(c, θ) -> (c,): the mean of the `beta` values of each lane closest to the lane's median (Bulyan's
    second stage), 0 < beta < θ.

    The beta values closest to the median are a window of the sorted lane around it: they drop k = θ - beta
    values, some of the k smallest and the rest of the k largest. So the sorted positions [k, θ - k) are always
    kept, and the k extremes kept are the k of the 2k extreme values closest to the median. Three selections
    (the median, then the k smallest and the k largest on half lanes) replace arg-partitioning a (c, θ) matrix
    of distances, about 3x faster. When 2k >= θ (only a few clients) there is no such middle: by distances."""
    theta = values.shape[1]
    k = theta - beta
    if 2 * k >= theta:
        median = lane_median(values)
        closest = np.argpartition(np.abs(values - median[:, None]), beta - 1, axis=1)[:, :beta]
        return np.take_along_axis(values, closest, axis=1).mean(axis=1)
    # one selection at the (upper) median splits each lane in halves; the k smallest come from the lower
    # half, the k largest from the upper one (NumPy's partition at several positions at once is far slower
    # than these single-position selections on half lanes)
    middle = theta // 2
    part = np.partition(values, middle, axis=1)
    upper = part[:, middle]
    median = upper if theta % 2 else (part[:, :middle].max(axis=1) + upper) / 2
    low = np.partition(part[:, :middle], k - 1, axis=1)                   # low[:, :k]: the k smallest
    high = np.partition(part[:, middle + 1:], theta - middle - 1 - k, axis=1)
    high_start = theta - middle - 1 - k                                   # high[:, high_start:]: the k largest
    extremes = np.concatenate([low[:, :k], high[:, high_start:]], axis=1)  # (c, 2k)
    nearest = np.argpartition(np.abs(extremes - median[:, None]), k - 1, axis=1)[:, :k]
    kept = (low[:, k:].sum(axis=1, dtype=np.float64) + upper + high[:, :high_start].sum(axis=1, dtype=np.float64)
            + np.take_along_axis(extremes, nearest, axis=1).sum(axis=1, dtype=np.float64))
    return (kept / beta).astype(values.dtype)


class Float64Blocks:
    """Column blocks converted to float64 in one reused buffer.

    A fresh float64 copy of every 100 x 262 144 block is a 210 MB allocation, which the allocator maps
    and the kernel zero-fills again each time: at 100 x 11 M that cost more than the arithmetic. The
    returned tensor is overwritten by the next call; use it before asking for another block."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def __call__(self, block: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        rows, cols = block.shape
        if self.buffer is None or self.buffer.shape[0] != rows or self.buffer.shape[1] < cols:
            self.buffer = torch.empty((rows, max(cols, COLUMN_BLOCK)), dtype=torch.float64, device=block.device)
        out = self.buffer[:, :cols]
        out.copy_(block)
        if offset is not None:
            out -= offset.to(torch.float64)  # in place on the buffer, never on the caller's matrix
        return out


def select_columns(matrix, index: torch.Tensor, rows: torch.Tensor | None = None,
                   offset: torch.Tensor | None = None) -> torch.Tensor:
    """(n, len(index)) float32: the columns `index` (any order, repeats allowed) of matrix[rows] - offset, in
    one pass over the column blocks that hold any of them (no copy of the whole matrix)."""
    n = matrix.shape[0] if rows is None else len(rows)
    out = torch.empty((n, len(index)), dtype=torch.float32, device=matrix.device)
    order = torch.argsort(index)
    wanted = index[order]
    for start in range(0, matrix.shape[1], COLUMN_BLOCK):
        end = min(start + COLUMN_BLOCK, matrix.shape[1])
        lo, hi = (int(i) for i in torch.searchsorted(wanted, torch.tensor([start, end])))
        if lo < hi:
            out[:, order[lo:hi]] = row_block(matrix, rows, start, end, offset)[:, wanted[lo:hi] - start]
    return out


def gram_matrix(matrix, rows: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                precise: bool = False) -> torch.Tensor:
    """(n, n) float64 Gram matrix G[i, j] = (x_i - offset)·(x_j - offset) of the rows of matrix[rows],
    accumulated over column blocks; no centred copy of the matrix is ever made. Float32 products within a
    block (one matrix product, the fast path on a CPU) and float64 sums across blocks; with `precise`, float64
    products too (2-3x slower), for cosines of vectors that are nearly parallel (FLAME, FoolsGold). Centring
    on a vector the rows are close to (their mean, the global model) keeps |x|² + |y|² - 2x·y from cancelling
    when distances are derived from G."""
    n = matrix.shape[0] if rows is None else len(rows)
    gram = torch.zeros((n, n), dtype=torch.float64, device=matrix.device)
    as_float64 = Float64Blocks() if precise else None
    for start in range(0, matrix.shape[1] if n else 0, COLUMN_BLOCK):
        end = min(start + COLUMN_BLOCK, matrix.shape[1])
        if as_float64 is not None:
            block = as_float64(row_block(matrix, rows, start, end), None if offset is None else offset[start:end])
            gram += block @ block.T
        else:
            block = row_block(matrix, rows, start, end, offset)
            gram += (block @ block.T).to(torch.float64)
    return gram


def row_statistics(matrix: torch.Tensor, rows: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                   against: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Squared L2 norms of the rows of matrix[rows] - offset and, with `against` (a (d,) vector), their
    dot products with it; float64, accumulated over column blocks (no float64 copy of the matrix)."""
    n = matrix.shape[0] if rows is None else len(rows)
    squares = torch.zeros(n, dtype=torch.float64, device=matrix.device)
    dots = torch.zeros(n, dtype=torch.float64, device=matrix.device) if against is not None else None
    as_float64 = Float64Blocks()
    for start in range(0, matrix.shape[1], COLUMN_BLOCK):
        end = start + COLUMN_BLOCK
        block = as_float64(row_block(matrix, rows, start, end), None if offset is None else offset[start:end])
        squares += torch.linalg.vector_norm(block, dim=1).square()
        if dots is not None:
            dots += block @ against[start:end].to(torch.float64)
    return squares, dots


def weighted_row_sum(matrix: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor | None = None,
                     offset: torch.Tensor | None = None) -> torch.Tensor:
    """(d,) float64: Σ_i weights[i] (matrix[rows][i] - offset), over column blocks."""
    w = weights.to(torch.float64)
    out = torch.empty(matrix.shape[1], dtype=torch.float64, device=matrix.device)
    as_float64 = Float64Blocks()
    for start in range(0, matrix.shape[1], COLUMN_BLOCK):
        end = start + COLUMN_BLOCK
        out[start:end] = w @ as_float64(row_block(matrix, rows, start, end),
                                        None if offset is None else offset[start:end])
    return out
