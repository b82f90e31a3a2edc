"""SDFC: Fisher calibration for backdoor-robust heterogeneous FL (Huang et al., ECCV 2024).

"Fisher Calibration for Backdoor-Robust Heterogeneous Federated Learning". Implemented as the official
code runs it (`Optims/PrevAbsFedFish.py`, `Server/ExpNegFishDiff.py`; ../shared/specs/algorithms.md §1):

Client k (the `SDFCClientHalf`, run by the ClientApp):
  C1  anchor θ̃_k = its own previous locally trained model (option `anchor: prev_local`, the code) or
      the global model it received (`prev_global`); θ_g in the client's first round.
  C2  D_k = the Fisher difference the server sent; in the first round D_k = |F(θ_g, local) - F_val|
      from the F_val(θ_g) the server sent.
  C3  loss = CE + λ · Σ D_k ⊙ (θ - θ̃_k)²
  C5  F_loc = F(θ_k, local training batches), returned as the `sdfc-floc` ArrayRecord.
Server (`FisherCalibrationStrategy`):
  S3  F_val_k = F(θ_k, server's clean split) for every reply, D_k = |F_loc_k - F_val_k| kept for k's next round
  S4  s_k = mean over parameter tensors of sum(D_k[tensor])
  S5  ŝ = min-max normalised s (all equal -> uniform), w = softmax(-ŝ)   (example counts NOT used)
  S6  θ_g = Σ w_k θ_k over the full state dict (BatchNorm buffers too; num_batches_tracked by max)

The Fisher is the code's estimator (spec §0.1 "E-code"): the square of the batch-averaged gradient of
the batch-mean log-likelihood, with the code's `log_softmax(out)[:, y]` cross-indexing (`code_cross`);
`per_sample` indexes each sample's own label; `empirical` is the textbook mean of squared per-sample
gradients (torch.func). The server computes F_val for the replies of a round one model after the other
(`batched: loop`, the default: the fastest here with one torch thread) or all at once with
`torch.func.functional_call` + `vmap` over stacked client parameters (`vmap`, or `auto` when the model
has no BatchNorm: a train-mode BatchNorm updates shared buffers in place, which vmap cannot batch).

[INFERRED] parts (spec §1(f)): the server computes F_val on the uploaded models (in the code the client
does, with the server's loader; `fval_on: client` ships the clean split to the clients instead); a client
the server has no D_k for (first round, or not sampled before) gets F_val(θ_g) and bootstraps as in
round 1; the code's "strong" validation augmentation is replaced by the dataset's own augmentation
when `val_augment: true` (off by default for the 28x28 sets, which the code augments weakly anyway).
"""

from __future__ import annotations

from collections.abc import Iterator
from logging import INFO
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, RecordDict
from flwr.common import log
from torch import nn
from torch.func import functional_call, grad, vmap

from strategies.aggregation import StateDict, weighted_average_states
from strategies.base import (
    AggregationOutcome,
    ClientHalf,
    ClientSideDefense,
    ClientUpdate,
    InvalidReply,
)
from task.data import InputSpec, to_unit_float

FISHER_ESTIMATORS = ("code_cross", "per_sample", "empirical")
ANCHORS = ("prev_local", "prev_global")
FVAL_ON = ("server", "client")

# record names in train messages and replies
FVAL_RECORD = "sdfc-fval"        # server -> client: F_val(θ_g), for a client without a D_k (bootstrap)
DIFF_RECORD = "sdfc-d"           # server -> client: D_k; client -> server in `fval_on: client` mode
FLOC_RECORD = "sdfc-floc"        # client -> server: F_loc(θ_k)
VAL_DATA_RECORD = "sdfc-val"     # server -> client in `fval_on: client` mode: the clean split
ANCHOR_STATE = "sdfc-anchor"     # context.state: the client's previous locally trained parameters
OWN_DIFF_STATE = "sdfc-own-d"    # context.state in `fval_on: client` mode: the D_k the client computed
FisherDict = dict[str, torch.Tensor]


# ---- Fisher estimators (pure) --------------------------------------------------------------------
def batch_log_likelihood(logits: torch.Tensor, y: torch.Tensor, estimator: str) -> torch.Tensor:
    """The batch-mean log-likelihood the E-code Fisher differentiates.

    `code_cross` reproduces the official code's `log_softmax(out)[:, y]`: a [B, B] matrix pairing every
    sample with every label of the batch, i.e. Σ_c (n_c/B) · mean_i log p(c|x_i). `per_sample` pairs each
    sample with its own label."""
    logp = F.log_softmax(logits, dim=1)
    if estimator == "code_cross":
        return logp[:, y].mean()
    return logp.gather(1, y[:, None]).mean()


def fisher_diagonal(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                    estimator: str = "code_cross", train_mode: bool = True) -> FisherDict:
    """Diagonal Fisher of `model` (its trainable parameters) over model-ready `batches`.

    code_cross / per_sample: (mean over batches of ∇ mean log-lik)², the code's estimator.
    empirical: mean over samples of (∇ log p(y_i|x_i))², per-sample gradients with torch.func."""
    if estimator not in FISHER_ESTIMATORS:
        raise ValueError(f"fisher estimator {estimator!r} is unknown; allowed: {', '.join(FISHER_ESTIMATORS)}")
    was_training = model.training
    model.train(train_mode)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    count = 0
    try:
        if estimator == "empirical":
            detached = {n: p.detach() for n, p in zip(names, params, strict=True)}
            buffers = dict(model.named_buffers())

            def sample_ll(p, x, y):
                out = functional_call(model, (p, buffers), (x[None],))
                return F.log_softmax(out, dim=1).gather(1, y.view(1, 1)).squeeze()  # gather: vmap-safe indexing

            per_sample_grad = vmap(grad(sample_ll), in_dims=(None, 0, 0))
            for x, y in batches:
                grads = per_sample_grad(detached, x, y)
                for i, n in enumerate(names):
                    acc[i] += (grads[n] ** 2).sum(0)
                count += len(y)
            return {n: a / max(count, 1) for n, a in zip(names, acc, strict=True)}
        for x, y in batches:
            ll = batch_log_likelihood(model(x), y, estimator)
            grads = torch.autograd.grad(ll, params, allow_unused=True)
            for a, g in zip(acc, grads, strict=True):
                if g is not None:
                    a += g
            count += 1
        return {n: (a / max(count, 1)) ** 2 for n, a in zip(names, acc, strict=True)}
    finally:
        model.train(was_training)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def fisher_of_states(model: nn.Module, states: list[StateDict], batches: list[tuple[torch.Tensor, torch.Tensor]],
                     estimator: str = "code_cross", train_mode: bool = True, batched: str = "auto",
                     chunk: int = 16) -> list[FisherDict]:
    """The E-code Fisher of every state dict in `states` over the same `batches` (the server's F_val).

    batched=auto: vmap over stacked parameters, `chunk` models at a time, when the model has no
    BatchNorm and the estimator is code_cross/per_sample; `loop`: one model after the other."""
    use_vmap = (batched == "vmap" or (batched == "auto" and not has_batchnorm(model))) and estimator != "empirical"
    if batched == "vmap" and (has_batchnorm(model) or estimator == "empirical"):
        raise ValueError("batched Fisher needs a model without BatchNorm and the code_cross/per_sample estimator")
    if not use_vmap:
        out = []
        for state in states:
            model.load_state_dict(state)
            out.append({n: f.detach().clone() for n, f in
                        fisher_diagonal(model, batches, estimator, train_mode).items()})
        return out
    was_training = model.training
    model.train(train_mode)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    buffers = {n: b for n, b in model.named_buffers()}
    device = next(model.parameters()).device

    def mean_ll(p, x, y):
        return batch_log_likelihood(functional_call(model, (p, buffers), (x,)), y, estimator)

    grad_over_models = vmap(grad(mean_ll), in_dims=(0, None, None))
    out: list[FisherDict] = []
    try:
        for start in range(0, len(states), chunk):
            group = states[start:start + chunk]
            stacked = {n: torch.stack([s[n] for s in group]).to(device, torch.float32) for n in names}
            acc = {n: torch.zeros_like(v) for n, v in stacked.items()}
            for x, y in batches:
                grads = grad_over_models(stacked, x, y)
                for n in names:
                    acc[n] += grads[n]
            for i in range(len(group)):
                out.append({n: (acc[n][i] / max(len(batches), 1)) ** 2 for n in names})
    finally:
        model.train(was_training)
    return out


def fisher_difference(f_loc: FisherDict, f_val: FisherDict) -> FisherDict:
    """D = |F_loc - F_val| per parameter tensor."""
    if set(f_loc) != set(f_val):
        raise ValueError("local and validation Fisher cover different parameters")
    return {n: (f_loc[n] - f_val[n]).abs() for n in f_val}


def fisher_score(diff: FisherDict) -> float:
    """s_k: the mean over parameter tensors of each tensor's sum of D_k (the code's reduction)."""
    return float(torch.stack([d.double().sum() for d in diff.values()]).mean())


def calibration_weights(scores: list[float] | torch.Tensor) -> torch.Tensor:
    """w = softmax(-ŝ) with ŝ the min-max normalised scores; equal scores give uniform weights.

    As ŝ ∈ [0, 1], the largest weight is at most e times the smallest (spec ambiguity 6)."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    spread = s.max() - s.min()
    normalised = (s - s.min()) / spread if spread > 0 else torch.zeros_like(s)
    return torch.softmax(-normalised, dim=0)


def fisher_regularizer(model: nn.Module, diff: FisherDict, anchor: FisherDict, lam: float) -> torch.Tensor:
    """λ · Σ D ⊙ (θ - θ̃)² over the trainable parameters (the anchor is a constant)."""
    terms = [(diff[n] * (p - anchor[n]) ** 2).sum() for n, p in model.named_parameters() if n in diff]
    return lam * torch.stack(terms).sum()


def model_batches(x: np.ndarray, y: np.ndarray, spec: InputSpec, batch_size: int, device: torch.device,
                  generator: torch.Generator | None = None, augment: bool = False, batch_hook=None,
                  drop_last: bool = True, shuffle: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Model-ready batches of uint8 NHWC images, the way local training builds them (the code's Fisher
    loaders: batch 64, drop_last, the training loader's augmentation; poisoned for an attacking client)."""
    labels = torch.as_tensor(np.asarray(y), dtype=torch.long)
    n = len(labels)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        xb, yb = to_unit_float(x[idx.numpy()]), labels[idx]
        if augment and spec.augment:
            xb = spec.augment_batch(xb, generator)
        if batch_hook is not None:
            xb, yb = batch_hook(xb, yb, generator)
        yield spec.to_model_input(xb.to(device)), yb.to(device)


def fisher_to_record(fisher: FisherDict) -> ArrayRecord:
    return ArrayRecord({n: f.detach().cpu().float() for n, f in fisher.items()})


# ---- client half -----------------------------------------------------------------------------------
class SDFCClientHalf(ClientHalf):
    """C1-C6 on the client: the Fisher-difference penalty during training, the local Fisher after."""

    def before_training(self, content: RecordDict, server_round: int) -> None:
        client = self.client
        opts = client.cfg.strategy
        self.lam = float(opts.lam)
        self.estimator = str(opts.fisher)
        self.train_mode = not bool(opts.fisher_eval_mode)
        self.fval_on = str(opts.fval_on)
        self.server_round = server_round
        model = client.model.to(client.device)
        global_params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        # C1: the anchor. prev_local: the client's own previous trained model, kept in context.state
        stored = self.state.get(ANCHOR_STATE)
        if str(opts.anchor) == "prev_local" and stored is not None:
            self.anchor = {n: t.to(client.device) for n, t in stored.to_torch_state_dict().items()}
        else:
            self.anchor = global_params
        # C2: D_k from the server, or the bootstrap |F(θ_g, local) - F_val(θ_g)|
        self.val_data = None
        if VAL_DATA_RECORD in content:
            val = content[VAL_DATA_RECORD].to_numpy_ndarrays()
            self.val_data = (val[0], val[1])
        if DIFF_RECORD in content:
            self.diff = {n: t.to(client.device) for n, t in content[DIFF_RECORD].to_torch_state_dict().items()}
        elif self.fval_on == "client" and self.state.get(OWN_DIFF_STATE) is not None:
            self.diff = {n: t.to(client.device) for n, t in self.state[OWN_DIFF_STATE].to_torch_state_dict().items()}
        else:
            if FVAL_RECORD in content:
                f_val = {n: t.to(client.device) for n, t in content[FVAL_RECORD].to_torch_state_dict().items()}
            elif self.val_data is not None:
                f_val = self.fisher_on(model, *self.val_data, poisoned=False, salt=1)
            else:
                raise ValueError("SDFC: the train message carries neither a Fisher difference nor F_val")
            self.diff = fisher_difference(self.fisher_on(model, client.x, client.y, poisoned=True, salt=2), f_val)
        if set(self.diff) != set(self.anchor):
            raise ValueError("SDFC: the Fisher difference does not cover the model's trainable parameters")

    def fisher_on(self, model: nn.Module, x, y, poisoned: bool, salt: int) -> FisherDict:
        client = self.client
        generator = torch.Generator().manual_seed(
            int(client.cfg.seed) * 1_000_003 + client.partition_id * 1009 + self.server_round * 7 + salt)
        hook = client.poison_hook(self.server_round) if poisoned else None
        batches = list(model_batches(x, y, client.data.spec, int(client.cfg.local.batch_size), client.device,
                                     generator, augment=True, batch_hook=hook))
        return fisher_diagonal(model, batches, self.estimator, self.train_mode)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.lam == 0:
            return None
        return fisher_regularizer(model, self.diff, self.anchor, self.lam)

    def after_training(self, model: nn.Module) -> dict[str, Any]:
        trained = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.state[ANCHOR_STATE] = ArrayRecord(trained)  # C4: next round's anchor (prev_local)
        f_loc = self.fisher_on(model, self.client.x, self.client.y, poisoned=True, salt=3)  # C5
        if self.fval_on == "client":
            # the client holds the clean split: it uploads D_k itself (spec ambiguity 2's second mode)
            f_val = self.fisher_on(model, *self.val_data, poisoned=False, salt=4)
            diff = fisher_to_record(fisher_difference(f_loc, f_val))
            self.state[OWN_DIFF_STATE] = diff
            return {DIFF_RECORD: diff}
        return {FLOC_RECORD: fisher_to_record(f_loc)}


# ---- server --------------------------------------------------------------------------------------
class FisherCalibrationStrategy(ClientSideDefense):
    """SDFC's server half: Fisher-difference scores -> softmax(-minmax) weights -> weighted average."""

    category = "reweighting"  # it reweights every client (the recorder reports the malicious weight mass)
    needs_server_data = True
    client_half = SDFCClientHalf

    def __init__(self, lam: float = 1.0, fisher: str = "code_cross", fisher_eval_mode: bool = False,
                 anchor: str = "prev_local", fval_on: str = "server", val_subset: int | None = None,
                 val_augment: bool = False, batched: str = "loop", fisher_chunk: int = 16,
                 fisher_batch_size: int | None = None, fisher_threads: int | None = 1, seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, value, allowed in (("fisher", fisher, FISHER_ESTIMATORS), ("anchor", anchor, ANCHORS),
                                     ("fval_on", fval_on, FVAL_ON), ("batched", batched, ("auto", "vmap", "loop"))):
            if value not in allowed:
                raise ValueError(f"strategy.{name}={value!r} is invalid; allowed: {', '.join(allowed)}")
        if lam < 0:
            raise ValueError(f"strategy.lam={lam} is invalid; allowed: >= 0")
        if val_subset is not None and int(val_subset) < 1:
            raise ValueError(f"strategy.val_subset={val_subset} is invalid; allowed: null or >= 1")
        if fisher_threads is not None and int(fisher_threads) < 1:
            raise ValueError(f"strategy.fisher_threads={fisher_threads} is invalid; allowed: null or >= 1")
        self.fisher_threads = None if fisher_threads is None else int(fisher_threads)
        self.lam, self.fisher, self.train_mode = float(lam), fisher, not fisher_eval_mode
        self.anchor, self.fval_on, self.val_subset, self.val_augment = anchor, fval_on, val_subset, val_augment
        self.batched, self.fisher_chunk, self.fisher_batch_size = batched, int(fisher_chunk), fisher_batch_size
        self.seed = int(seed)
        self.differences: dict[int, FisherDict] = {}  # node id -> D_k of its latest round (CPU)
        self._model: nn.Module | None = None
        self._bootstrap_fval: ArrayRecord | None = None
        self._val_record: ArrayRecord | None = None

    # -- the server's clean split ----------------------------------------------------------------
    def validation_data(self) -> tuple[np.ndarray, np.ndarray]:
        ctx = self.server_context
        x, y = ctx.x_val, ctx.y_val
        if self.val_subset is not None and self.val_subset < len(y):
            pick = np.sort(np.random.default_rng(self.seed).choice(len(y), int(self.val_subset), replace=False))
            x, y = x[pick], y[pick]
        return x, y

    def validation_batches(self, server_round: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ctx = self.server_context
        x, y = self.validation_data()
        batch_size = int(self.fisher_batch_size or ctx.local.batch_size)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + server_round)
        return list(model_batches(x, y, ctx.spec, batch_size, ctx.device, generator, augment=self.val_augment))

    def model(self) -> nn.Module:
        if self._model is None:
            self._model = self.server_context.build_model().to(self.server_context.device)
        return self._model

    def validation_fisher(self, states: list[StateDict], server_round: int) -> list[FisherDict]:
        # Torch threads: in simulation the server shares the cores with the client actors; measured on
        # 2 cores under load, 10 simple_cnn models x 1 216 images took 2.3 s with 1 thread and 32 s with 2.
        previous = torch.get_num_threads()
        if self.fisher_threads is not None:
            torch.set_num_threads(self.fisher_threads)
        try:
            return fisher_of_states(self.model(), states, self.validation_batches(server_round), self.fisher,
                                    self.train_mode, self.batched, self.fisher_chunk)
        finally:
            torch.set_num_threads(previous)

    # -- train messages ----------------------------------------------------------------------------
    def configure_train(self, server_round, arrays, config, grid):
        self._bootstrap_fval = None
        if self.fval_on == "client" and self._val_record is None:
            x, y = self.validation_data()
            self._val_record = ArrayRecord([np.ascontiguousarray(x), np.asarray(y, dtype=np.int64)])
        return super().configure_train(server_round, arrays, config, grid)

    def client_records(self, server_round: int, node_id: int) -> dict[str, Any]:
        if self.fval_on == "client":
            return {VAL_DATA_RECORD: self._val_record}
        if node_id in self.differences:
            return {DIFF_RECORD: fisher_to_record(self.differences[node_id])}
        # never seen (round 1, or first sampled now): F_val at the current global model, computed once a round
        if self._bootstrap_fval is None:
            self._bootstrap_fval = fisher_to_record(self.validation_fisher([self.global_state], server_round)[0])
        return {FVAL_RECORD: self._bootstrap_fval}

    # -- aggregation -------------------------------------------------------------------------------
    def validate_update(self, update: ClientUpdate) -> None:
        # a reply without a usable Fisher record is rejected before aggregation (the round goes on)
        self.reply_fisher(update, DIFF_RECORD if self.fval_on == "client" else FLOC_RECORD, self.parameter_shapes())

    def aggregate_updates(self, server_round: int, global_state: StateDict,
                          updates: list[ClientUpdate]) -> AggregationOutcome:
        shapes = self.parameter_shapes()
        if self.fval_on == "client":
            diffs = [self.reply_fisher(u, DIFF_RECORD, shapes) for u in updates]
        else:
            f_locs = [self.reply_fisher(u, FLOC_RECORD, shapes) for u in updates]
            f_vals = self.validation_fisher([u.state for u in updates], server_round)
            diffs = [fisher_difference(fl, fv) for fl, fv in zip(f_locs, f_vals, strict=True)]
        for update, diff in zip(updates, diffs, strict=True):
            self.differences[update.node_id] = {n: d.detach().cpu() for n, d in diff.items()}
        scores = [fisher_score(d) for d in diffs]
        weights = calibration_weights(scores)
        log(INFO, "round %d: SDFC scores %s -> weights %s", server_round,
            " ".join(f"{s:.3g}" for s in scores), " ".join(f"{float(w):.3f}" for w in weights))
        state = weighted_average_states([u.state for u in updates], weights)
        return AggregationOutcome(
            state=state, weights={u.node_id: float(w) for u, w in zip(updates, weights, strict=True)},
            info={"sdfc_score_min": min(scores), "sdfc_score_max": max(scores),
                  "sdfc_weight_max_over_min": float(weights.max() / weights.min())},
            client_info={u.node_id: {"sdfc_score": s} for u, s in zip(updates, scores, strict=True)})

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self.model().named_parameters() if p.requires_grad}

    @staticmethod
    def reply_fisher(update: ClientUpdate, record: str, shapes: dict[str, tuple[int, ...]]) -> FisherDict:
        found = update.extras.get(record)
        if not isinstance(found, ArrayRecord):
            raise InvalidReply(f"SDFC: the reply carries no '{record}' ArrayRecord", "defense-record")
        try:
            fisher = {n: t.float() for n, t in found.to_torch_state_dict().items()}
        except Exception as exc:
            raise InvalidReply(f"SDFC: '{record}' cannot be read: {exc}", "defense-record") from None
        if set(fisher) != set(shapes) or any(tuple(fisher[n].shape) != shapes[n] for n in shapes):
            raise InvalidReply(f"SDFC: '{record}' does not match the model's trainable parameters", "defense-record")
        if not all(torch.isfinite(t).all() and (t >= 0).all() for t in fisher.values()):
            raise InvalidReply(f"SDFC: '{record}' holds negative or non-finite values", "defense-record")
        return fisher

    # -- checkpoint --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"differences": self.differences}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.differences = dict(state.get("differences", {}))

