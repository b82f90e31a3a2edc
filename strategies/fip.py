"""FIP and Fast FIP: Fisher-guided purification of a backdoored global model on the server.

Karim, Arafat, Rakin, Guo, Rahnavard, "Fisher Information guided Purification against Backdoor
Attacks", ACM CCS 2024, https://arxiv.org/abs/2409.00863; official code
github.com/nazmul-karim170/FIP-Fisher-Backdoor-Removal @ b787f04 (spec: /work/shared/specs/algorithms.md §4).

Backdoored models sit in sharper minima (larger top Hessian eigenvalue λ_max). FIP fine-tunes the model
θ̄ on a small clean set towards a smooth minimum with two Fisher-based regularizers:

    L(θ) = CE(f_θ(x), y) + η_F · TrF(θ; x) + η_r · ½ Σ_j F̄_j (θ_j − θ̄_j)²
           (clean loss)   (backdoor suppressor)  (clean-accuracy retainer, EWC form, anchored at θ̄)

B1 (`impl=paper`, default; the exact equation is not public, this form is INFERRED from the abstract):
    TrF = ‖∇_θ (1/B) Σ_i log p_θ(ŷ_i|x_i)‖² (`trace=fisher`, the Fisher penalty) or its Hutchinson
    estimate (1/m) Σ_v (g·v)² with Rademacher v (`trace=hutchinson`); ŷ ~ p_θ(·|x) (`fisher_labels=sampled`,
    true Fisher) or ŷ = y (`true`). Both need a double backward pass.
B2 (`impl=code`): what the release runs: every `code_iter_gap`-th step, the zero-mean random projection
    Σ_v Σ_l cumsum_l(g·V) / m of g = ∇ mean(log_softmax(out)[:, y]) (the [B, B] indexing quirk kept), with
    m Gaussian probes; retainer off (commented out in the release), SGD lr 0.005, momentum 0.95.
B3 Fast FIP (`fast=true`): every Conv2d/Linear is re-parameterised as W' = U diag(ReLU(S + δ)) Vᵀ from
    its SVD; the original weights (and biases, BatchNorm) are frozen and only the singular-value shift δ
    is trained. TrF and the retainer act on the effective weights W'(δ) (INFERRED; the release's wiring
    file is empty).

In federated learning (INFERRED: the paper is centralised) it is a server-side post-aggregation step
on the server's clean split, orthogonal to the aggregation rule (conf/purification/fip.yaml): after
the final round, or every p rounds from round t. `python -m strategies.fip --checkpoint RUN_DIR` purifies
a saved global model and prints MA/ASR/λ_max before and after (the paper's centralised use).

Sharpness: λ_max by power iteration on Hessian-vector products of the clean cross-entropy.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from task.data import InputSpec, to_unit_float


# ---- configuration (the keys of conf/purification/fip.yaml; paper symbols named once) ---------------
@dataclass(frozen=True)
class FIPConfig:
    impl: str = "paper"             # paper (B1) | code (B2, the released code)
    fast: bool = False              # Fast FIP: train only the singular-value shift δ
    trace: str = "fisher"           # B1 suppressor: fisher (‖g‖²) | hutchinson ((g·v)², `probes` probes)
    fisher_labels: str = "sampled"  # ŷ in g: sampled from the model (true Fisher) | true (the labels)
    probes: int = 1                 # Hutchinson probes per step
    eta_f: float = 0.5              # η_F, suppressor weight (the code's --reg_F)
    eta_r: float = 5.0              # η_r, retainer weight (the code's class default `weight`)
    retainer_fisher: str = "empirical"  # F̄: empirical (mean squared per-sample grads) | code (E-code, [:, y] quirk)
    fisher_samples: int = 1000      # clean samples used for F̄
    val_size: int | None = None     # use at most this many samples of the server split (None: all)
    epochs: float = 10.0            # passes over the clean set (iterations = ceil(epochs · n / batch_size))
    iterations: int | None = None   # overrides `epochs` when set (the code: 2000)
    batch_size: int = 128
    lr: float = 0.005
    momentum: float = 0.95
    weight_decay: float = 0.0
    clip_grad_norm: float | None = None  # clip the step's gradient norm (INFERRED: not in the release)
    fast_lr: float | None = None    # Fast FIP's lr and epochs (None: the same as FIP's)
    fast_epochs: float | None = None
    code_iter_gap: int = 5          # B2: suppressor every k-th step
    code_probes: int = 20           # B2: Gaussian probes
    lambda_iterations: int = 20     # power-iteration steps for λ_max (0: skip)
    lambda_samples: int = 1000      # clean samples the Hessian is taken on
    seed: int = 0

    def __post_init__(self) -> None:
        allowed = {"impl": ("paper", "code"), "trace": ("fisher", "hutchinson"),
                   "fisher_labels": ("sampled", "true"), "retainer_fisher": ("empirical", "code")}
        for key, values in allowed.items():
            if getattr(self, key) not in values:
                raise ValueError(f"purification.{key}={getattr(self, key)!r} is unknown; allowed: {', '.join(values)}")
        if self.batch_size < 1 or self.probes < 1 or self.code_probes < 1 or self.code_iter_gap < 1:
            raise ValueError("purification.batch_size, probes, code_probes and code_iter_gap must be >= 1")

    @classmethod
    def from_mapping(cls, mapping: dict[str, Any]) -> FIPConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(mapping) - names - {"name", "when", "every", "start_round", "_target_"}
        if unknown:
            raise ValueError(f"unknown purification keys: {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in mapping.items() if k in names})


# ---- parameters as lists of tensors --------------------------------------------------------------------
def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))


def log_likelihood(logits: torch.Tensor, labels: torch.Tensor, cross_indexing: bool = False) -> torch.Tensor:
    """Mean log p(y|x) over the batch. `cross_indexing` reproduces the release's log_softmax(out)[:, y],
    which pairs every sample with every label of the batch (spec §0.1)."""
    logp = F.log_softmax(logits, dim=1)
    if cross_indexing:
        return logp[:, labels].mean()
    return logp.gather(1, labels[:, None]).mean()


# ---- the backdoor suppressor ---------------------------------------------------------------------------
def fisher_penalty(grads: list[torch.Tensor]) -> torch.Tensor:
    """‖g‖², g = ∇_θ mean log p(ŷ|x) (differentiable when g was taken with create_graph=True)."""
    return sum((g * g).sum() for g in grads)


def hutchinson_penalty(grads: list[torch.Tensor], probes: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """(1/m) Σ_v (g·v)² with m Rademacher probes v: an unbiased estimate of ‖g‖² (E[v vᵀ] = I)."""
    total = 0.0
    for g in grads:
        v = torch.randint(0, 2, (probes, *g.shape), generator=generator).to(g) * 2 - 1
        total = total + (v * g).flatten(1).sum(1)  # per probe: g·v accumulated over layers
    return (total ** 2).mean()


def code_projection(grads: list[torch.Tensor], probes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The release's `tr` (B2): for each Gaussian V, the running sum over layers of Σ(g_l ⊙ V_l) is appended
    after every layer, and all appended values are summed and divided by the probe count. Linear in g, so
    zero-mean over V: a stochastic curvature term, not Tr(F)."""
    per_layer = torch.stack([(torch.randn((probes, *g.shape), generator=generator).to(g) * g).flatten(1).sum(1)
                             for g in grads], dim=1)  # (probes, layers)
    return per_layer.cumsum(dim=1).sum() / probes


# ---- the clean-accuracy retainer -----------------------------------------------------------------------
def diagonal_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor, estimator: str = "empirical",
                    batch_size: int = 100) -> dict[str, torch.Tensor]:
    """Diagonal Fisher F̄ of the trainable parameters at the current model, on model-input tensors (x, y).

    empirical: mean_i (∂ log p(y_i|x_i)/∂θ)² from per-sample gradients (torch.func.vmap), the textbook
    EWC importance. code: (mean over batches of ∇ mean log_softmax(out)[:, y])², the release's estimator
    (spec §0.1 E-code, quirk kept); it is small near a stationary point. Computed in eval mode."""
    was_training = model.training
    model.eval()
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    n_batches = 0
    if estimator == "empirical":
        def sample_log_likelihood(p, xi, yi):
            out = functional_call(model, (p, buffers), (xi[None],))
            return F.log_softmax(out, dim=1).gather(1, yi.reshape(1, 1)).sum()

        per_sample = vmap(grad(sample_log_likelihood), in_dims=(None, 0, 0))
        for start in range(0, len(y), batch_size):
            grads = per_sample(params, x[start:start + batch_size], y[start:start + batch_size])
            for k, g in grads.items():
                fisher[k] += (g * g).sum(0)
        for k in fisher:
            fisher[k] /= max(len(y), 1)
    elif estimator == "code":
        keys = list(params)
        plist = [dict(model.named_parameters())[k] for k in keys]
        mean_grad = [torch.zeros_like(p) for p in plist]
        for start in range(0, len(y), batch_size):
            out = model(x[start:start + batch_size])
            gs = torch.autograd.grad(log_likelihood(out, y[start:start + batch_size], cross_indexing=True), plist)
            for m, g in zip(mean_grad, gs, strict=True):
                m += g
            n_batches += 1
        fisher = {k: (m / max(n_batches, 1)) ** 2 for k, m in zip(keys, mean_grad, strict=True)}
    else:
        raise ValueError(f"unknown Fisher estimator {estimator!r}; allowed: empirical, code")
    model.train(was_training)
    return fisher


def retainer_penalty(current: list[torch.Tensor], anchor: list[torch.Tensor],
                     fisher: list[torch.Tensor]) -> torch.Tensor:
    """½ Σ_j F̄_j (θ_j − θ̄_j)²."""
    return 0.5 * sum((f * (c - a) ** 2).sum() for c, a, f in zip(current, anchor, fisher, strict=True))


# ---- sharpness: λ_max by power iteration on Hessian-vector products -----------------------------------
def loss_hvp(model: nn.Module, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 500) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """v ↦ H v, H the Hessian of the mean cross-entropy over (x, y) w.r.t. `params` (chunked: Σ_c n_c/n H_c v)."""
    n = len(y)

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        out = [torch.zeros_like(p) for p in params]
        for start in range(0, n, batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            loss = F.cross_entropy(model(xb), yb) * (len(yb) / n)
            gs = torch.autograd.grad(loss, params, create_graph=True)
            hv = torch.autograd.grad(dot(list(gs), v), params)
            for o, h in zip(out, hv, strict=True):
                o += h
        return out

    return hvp


def power_iteration(hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]], like: list[torch.Tensor],
                    iterations: int = 20, generator: torch.Generator | None = None, tol: float = 1e-4) -> float:
    """Dominant Hessian eigenvalue (the Rayleigh quotient vᵀHv of the converged unit v); stops early when
    it changes by less than `tol` relative."""
    v = [torch.randn(p.shape, generator=generator).to(p) for p in like]
    norm = torch.sqrt(dot(v, v))
    v = [t / norm for t in v]
    eigenvalue = 0.0
    for _ in range(iterations):
        hv = hvp(v)
        new = float(dot(hv, v))
        norm = torch.sqrt(dot(hv, hv))
        if norm == 0:
            return 0.0
        v = [t / norm for t in hv]
        if abs(new - eigenvalue) <= tol * max(abs(new), 1e-12):
            return new
        eigenvalue = new
    return eigenvalue


def top_hessian_eigenvalue(model: nn.Module, x: torch.Tensor, y: torch.Tensor, iterations: int = 20,
                           seed: int = 0, batch_size: int = 500) -> float:
    """λ_max of the clean loss at the model's trainable parameters, in eval mode (model-input tensors)."""
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    value = power_iteration(loss_hvp(model, params, x, y, batch_size), params, iterations,
                            torch.Generator().manual_seed(seed))
    model.train(was_training)
    return value


# ---- Fast FIP: singular-value shift wrappers ----------------------------------------------------------
class SpectralShift(nn.Module):
    """A frozen Conv2d/Linear whose weight is W' = U diag(ReLU(S + scale·δ)) Vᵀ (SVD of W reshaped to
    [C_out, C_in·k·k]); only δ (initialised at 0) is trainable, so δ = 0 gives back W (S ≥ 0)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, scale: float = 1.0) -> None:
        super().__init__()
        weight = layer.weight.detach()
        # float64 SVD: the reconstruction error is then the float32 matmul's, well under 1e-5
        u, s, vh = torch.linalg.svd(weight.reshape(weight.shape[0], -1).double(), full_matrices=False)
        self.register_buffer("u", u.to(weight.dtype))
        self.register_buffer("s", s.to(weight.dtype))
        self.register_buffer("vh", vh.to(weight.dtype))
        self.weight_shape = tuple(weight.shape)
        self.base = layer
        for p in layer.parameters():
            p.requires_grad_(False)
        self.delta = nn.Parameter(torch.zeros_like(self.s))
        self.scale = scale
        self.last_weight: torch.Tensor | None = None  # W'(δ) of the last forward (the suppressor's variable)

    def effective_weight(self) -> torch.Tensor:
        return ((self.u * F.relu(self.s + self.scale * self.delta)) @ self.vh).reshape(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.effective_weight()
        self.last_weight = weight
        if isinstance(self.base, nn.Conv2d):
            return self.base._conv_forward(x, weight, self.base.bias)
        return F.linear(x, weight, self.base.bias)


def to_spectral_model(model: nn.Module) -> tuple[nn.Module, dict[str, SpectralShift]]:
    """A deep copy of `model` with every Conv2d/Linear wrapped (name -> wrapper); every other parameter frozen."""
    wrapped = copy.deepcopy(model)
    for p in wrapped.parameters():
        p.requires_grad_(False)
    layers: dict[str, SpectralShift] = {}
    for name, module in list(wrapped.named_modules()):
        if isinstance(module, nn.Conv2d | nn.Linear):
            shift = SpectralShift(module)
            parent_name, _, child = name.rpartition(".")
            setattr(wrapped.get_submodule(parent_name) if parent_name else wrapped, child, shift)
            layers[name] = shift
    return wrapped, layers


def merge_spectral_model(original: nn.Module, layers: dict[str, SpectralShift]) -> nn.Module:
    """A plain copy of `original` (same state-dict keys) carrying the effective weights W'(δ)."""
    merged = copy.deepcopy(original)
    with torch.no_grad():
        for name, shift in layers.items():
            merged.get_submodule(name).weight.copy_(shift.effective_weight())
    return merged


# ---- the purification loop ----------------------------------------------------------------------------
def batch_indices(n: int, batch_size: int, iterations: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Minibatches drawn with replacement (the release's RandomSampler(replacement=True))."""
    for _ in range(iterations):
        yield torch.randint(0, n, (min(batch_size, n),), generator=generator)


def iteration_count(cfg: FIPConfig, n: int) -> tuple[int, float]:
    """(iterations, lr) for this FIP/Fast-FIP setting on n clean samples."""
    epochs = cfg.fast_epochs if cfg.fast and cfg.fast_epochs is not None else cfg.epochs
    lr = cfg.fast_lr if cfg.fast and cfg.fast_lr is not None else cfg.lr
    if cfg.iterations is not None and not (cfg.fast and cfg.fast_epochs is not None):
        return int(cfg.iterations), lr
    return max(1, math.ceil(epochs * n / cfg.batch_size)), lr


def model_inputs(x_uint8: np.ndarray, spec: InputSpec, device: torch.device) -> torch.Tensor:
    return spec.to_model_input(to_unit_float(x_uint8).to(device))


def purify(model: nn.Module, x_val: np.ndarray, y_val: np.ndarray, spec: InputSpec, cfg: FIPConfig,
           device: torch.device | str = "cpu",
           sharpness_data: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Purify `model` on the clean set (uint8 NHWC `x_val`, labels `y_val`). Returns a new plain model
    (same state-dict keys; the input is not modified) and stats: λ_max before/after (on `sharpness_data`,
    default the clean set), seconds, iterations, trained parameter count, mean loss terms.

    The timed part (`seconds`) is the Fisher of the retainer plus the optimisation; λ_max is not included."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    n_total = len(y_val)
    if cfg.val_size is not None and cfg.val_size < n_total:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(n_total, int(cfg.val_size), replace=False))
        x_val, y_val = x_val[keep], y_val[keep]
    if len(y_val) == 0:
        raise ValueError("FIP needs a non-empty clean set (server.val_fraction > 0)")
    original = copy.deepcopy(model).to(device)
    x_pixels = to_unit_float(x_val)
    labels = torch.as_tensor(y_val, dtype=torch.long)

    def sharpness(net: nn.Module) -> float | None:
        if cfg.lambda_iterations <= 0:
            return None
        xs, ys = sharpness_data if sharpness_data is not None else (x_val, y_val)
        k = min(len(ys), cfg.lambda_samples)
        xt = model_inputs(xs[:k], spec, device)
        yt = torch.as_tensor(ys[:k], dtype=torch.long, device=device)
        return top_hessian_eigenvalue(net, xt, yt, cfg.lambda_iterations, seed=cfg.seed)

    stats: dict[str, Any] = {"impl": cfg.impl, "fast": cfg.fast, "n_val": len(y_val),
                             "lambda_max_before": sharpness(original)}
    t0 = time.perf_counter()
    code = cfg.impl == "code"
    eta_r = 0.0 if code else cfg.eta_r  # the release computes the retainer's buffers but never uses its loss

    if cfg.fast:
        net, layers = to_spectral_model(original)
        trained = [s.delta for s in layers.values()]
        anchor_names = [f"{name}.weight" for name in layers]
    else:
        net, layers = copy.deepcopy(original), {}
        for p in net.parameters():
            p.requires_grad_(True)
        trained = [p for p in net.parameters() if p.requires_grad]
        anchor_names = [k for k, p in net.named_parameters() if p.requires_grad]
    anchors = [original.get_parameter(k).detach().clone() for k in anchor_names]
    fisher = None
    if eta_r > 0:
        k = min(len(labels), cfg.fisher_samples)
        fisher_all = diagonal_fisher(original, spec.to_model_input(x_pixels[:k].to(device)), labels[:k].to(device),
                                     cfg.retainer_fisher)
        fisher = [fisher_all[k] for k in anchor_names]

    def suppressed_variables() -> list[torch.Tensor]:
        # the variables of TrF and the retainer: θ itself, or Fast FIP's effective weights W'(δ)
        return [s.last_weight for s in layers.values()] if cfg.fast else trained

    iterations, lr = iteration_count(cfg, len(labels))
    optimizer = torch.optim.SGD(trained, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # Fast FIP keeps BatchNorm frozen (running statistics too); FIP fine-tunes in train mode like the release
    net.to(device).train(not cfg.fast)
    sums = {"loss": 0.0, "ce": 0.0, "suppressor": 0.0, "retainer": 0.0, "skipped_steps": 0}
    for it, idx in enumerate(batch_indices(len(labels), cfg.batch_size, iterations, generator)):
        xb = x_pixels[idx]
        if spec.augment:
            xb = spec.augment_batch(xb, generator)
        xb, yb = spec.to_model_input(xb.to(device)), labels[idx].to(device)
        out = net(xb)
        ce = F.cross_entropy(out, yb)
        loss = ce
        variables = suppressed_variables()
        if code and cfg.eta_f != 0 and it % cfg.code_iter_gap == 0:
            g = torch.autograd.grad(log_likelihood(out, yb, cross_indexing=True), variables, create_graph=True)
            suppressor = code_projection(list(g), cfg.code_probes, generator)
            loss = loss + cfg.eta_f * suppressor
            sums["suppressor"] += float(suppressor.detach())
        elif not code and cfg.eta_f != 0:
            if cfg.fisher_labels == "sampled":
                with torch.no_grad():
                    probs = F.softmax(out.detach().float(), dim=1).nan_to_num(1.0 / out.shape[1])
                    target = torch.multinomial(probs, 1, generator=generator)
                target = target[:, 0].to(device)
            else:
                target = yb
            g = torch.autograd.grad(log_likelihood(out, target), variables, create_graph=True)
            suppressor = (fisher_penalty(list(g)) if cfg.trace == "fisher"
                          else hutchinson_penalty(list(g), cfg.probes, generator))
            loss = loss + cfg.eta_f * suppressor
            sums["suppressor"] += float(suppressor.detach())
        if fisher is not None:
            retainer = retainer_penalty(variables, anchors, fisher)
            loss = loss + eta_r * retainer
            sums["retainer"] += float(retainer.detach())
        if not torch.isfinite(loss):
            # the double-backward penalty can blow up at a large η_F·lr; skip the step rather than poison θ
            sums["skipped_steps"] += 1
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trained, cfg.clip_grad_norm)
        optimizer.step()
        sums["loss"] += float(loss.detach())
        sums["ce"] += float(ce.detach())

    purified = merge_spectral_model(original, layers) if cfg.fast else net
    for p in purified.parameters():
        p.requires_grad_(True)
    purified.eval()
    stats.update({"seconds": time.perf_counter() - t0, "iterations": iterations, "lr": lr,
                  "trained_parameters": sum(p.numel() for p in trained),
                  "skipped_steps": sums.pop("skipped_steps"),
                  **{f"mean_{k}": v / max(iterations, 1) for k, v in sums.items()}})
    stats["lambda_max_after"] = sharpness(purified)
    return purified, stats


# ---- glue: the server hook and the checkpoint CLI -----------------------------------------------------
def purification_enabled(cfg: Any) -> bool:
    """True when the run's config asks for purification (conf/purification/, default `none`)."""
    group = cfg.get("purification") if hasattr(cfg, "get") else None
    return group is not None and str(group.get("name", "none")) != "none"


class Purifier:
    """When and how the server purifies the global model (built from the `purification` config group)."""

    def __init__(self, group: dict[str, Any], seed: int = 0) -> None:
        self.when = str(group.get("when", "final"))
        if self.when not in ("final", "every"):
            raise ValueError(f"purification.when={self.when!r} is unknown; allowed: final, every")
        self.every = int(group.get("every", 1))
        self.start_round = int(group.get("start_round", 1))
        if self.every < 1:
            raise ValueError(f"purification.every={self.every} must be >= 1")
        self.config = FIPConfig.from_mapping({**group, "seed": int(group.get("seed", seed) or seed)})

    @classmethod
    def from_run_config(cls, cfg: Any) -> Purifier | None:
        if not purification_enabled(cfg):
            return None
        from omegaconf import OmegaConf

        return cls(OmegaConf.to_container(cfg.purification, resolve=True), seed=int(cfg.seed))

    def due(self, server_round: int, num_rounds: int) -> bool:
        if self.when == "final":
            return server_round == num_rounds
        return server_round >= self.start_round and (server_round - self.start_round) % self.every == 0

    def __call__(self, model: nn.Module, x_val: np.ndarray, y_val: np.ndarray, spec: InputSpec,
                 device: torch.device, sharpness_data: tuple[np.ndarray, np.ndarray] | None = None,
                 server_round: int = 0) -> tuple[nn.Module, dict[str, Any]]:
        # a different sampling stream per purified round, reproducible from the run's seed
        cfg = FIPConfig(**{**self.config.__dict__, "seed": self.config.seed * 1000 + server_round})
        return purify(model, x_val, y_val, spec, cfg, device, sharpness_data)

    def attach(self, x_val: np.ndarray, y_val: np.ndarray, spec: InputSpec, device: torch.device,
               sharpness_data: tuple[np.ndarray, np.ndarray] | None) -> Purifier:
        """The server's clean split and the held-out λ_max data, given once before round 1."""
        if len(y_val) == 0:
            raise ValueError("purification needs the server's clean split (server.val_fraction > 0)")
        self.data = (x_val, y_val, spec, device, sharpness_data)
        return self

    def purify_state(self, model: nn.Module, state: dict[str, torch.Tensor], server_round: int,
                     evaluate: Callable[[nn.Module], tuple[float, float | None]]) -> tuple[dict, dict[str, Any]]:
        """Purify a global state dict (loaded into `model`); returns the new state and the record row
        (`"phase": "purify"`, MA/ASR/λ_max before and after, seconds)."""
        x_val, y_val, spec, device, sharpness_data = self.data
        model.load_state_dict(state)
        ma_before, asr_before = evaluate(model)
        purified, stats = self(model, x_val, y_val, spec, device, sharpness_data, server_round)
        ma_after, asr_after = evaluate(purified)
        new_state = {k: v.detach().cpu().clone() for k, v in purified.state_dict().items()}
        row = {"round": server_round, "phase": "purify", "method": "fast_fip" if self.config.fast else "fip",
               "ma_before": ma_before, "asr_before": asr_before, "ma_after": ma_after, "asr_after": asr_after,
               "lambda_max_before": stats.pop("lambda_max_before"), "lambda_max_after": stats.pop("lambda_max_after"),
               "t_purify": stats.pop("seconds"), "purify": stats}
        return new_state, row


def sharpness_subset(x: np.ndarray, y: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed seeded subset of the clean test set for λ_max (held out from what FIP optimises)."""
    idx = np.sort(np.random.default_rng(seed).choice(len(y), min(size, len(y)), replace=False))
    return x[idx], y[idx]


def main(argv: list[str] | None = None) -> None:
    """Purify a saved global model: python -m strategies.fip --checkpoint RUN_DIR [key=value ...]."""
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    # The CLI is an entry point like server.launch; the defense math above never imports server.
    from server.evaluation import attack_success_rate, main_accuracy
    from task.config import resolve_device
    from task.data import federated_data
    from task.train import build_model

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--checkpoint", required=True, help="a run folder (with config.yaml) or its checkpoint.pt")
    parser.add_argument("--config", default=None, help="config.yaml (default: next to the checkpoint)")
    parser.add_argument("--compare-fast", action="store_true", help="also run Fast FIP (or FIP) side by side")
    parser.add_argument("--out", default=None, help="write the before/after figures as JSON here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadiest on a shared CPU)")
    parser.add_argument("overrides", nargs="*", help="FIP keys, e.g. fast=true eta_f=1.0 val_size=600")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    path = Path(args.checkpoint)
    ckpt_path = path / "checkpoint.pt" if path.is_dir() else path
    run_cfg = OmegaConf.load(args.config or ckpt_path.parent / "config.yaml")
    if float(run_cfg.server.val_fraction) == 0.0:
        raise SystemExit("the run has no server clean split (server.val_fraction=0)")
    group = dict(OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parent.parent / "conf"
                                                       / "purification" / "fip.yaml")))
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key not in group and key not in {f.name for f in fields(FIPConfig)}:
            raise SystemExit(f"unknown FIP key {key!r}")
        group[key] = __import__("yaml").safe_load(value)
    purifier = Purifier(group, seed=int(run_cfg.seed))

    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    data = federated_data(run_cfg)
    device = resolve_device(run_cfg.device)
    model = build_model(run_cfg, data.spec, data.num_classes).to(device)
    model.load_state_dict(checkpoint["global_state"])
    poison = instantiate(run_cfg.attack.poison) if run_cfg.attack.get("poison") is not None else None
    x_val, y_val = data.server_data()
    sharp = sharpness_subset(data.test_x, data.test_y, purifier.config.lambda_samples, int(run_cfg.seed))

    def figures(net: nn.Module) -> tuple[float, float | None]:
        ma = main_accuracy(net, data.test_x, data.test_y, data.spec, device)
        asr = (attack_success_rate(net, data.test_x, data.test_y, data.spec, device, poison,
                                   bool(run_cfg.asr.exclude_target)) if poison is not None else None)
        return ma, asr

    def pct(v: float | None) -> str:
        return "  n/a " if v is None else f"{100 * v:6.2f}%"

    ma0, asr0 = figures(model)
    variants = [purifier.config]
    if args.compare_fast:
        variants.append(FIPConfig(**{**purifier.config.__dict__, "fast": not purifier.config.fast}))
    results = {"checkpoint": str(ckpt_path), "round": checkpoint.get("round"), "ma_before": ma0, "asr_before": asr0,
               "attack": run_cfg.attack.name, "dataset": run_cfg.dataset.name, "runs": []}
    print(f"{run_cfg.dataset.name} / {run_cfg.attack.name} / round {checkpoint.get('round')}: "
          f"MA {pct(ma0)} | ASR {pct(asr0)} before purification ({len(y_val)} clean samples at the server, "
          f"{min(len(y_val), purifier.config.val_size or len(y_val))} used)")
    for variant in variants:
        purified, stats = purify(model, x_val, y_val, data.spec, variant, device, sharp)
        ma1, asr1 = figures(purified)
        name = "Fast FIP" if variant.fast else "FIP"
        print(f"{name:8s} ({variant.impl}): MA {pct(ma0)} -> {pct(ma1)} | ASR {pct(asr0)} -> {pct(asr1)} | "
              f"λ_max {stats['lambda_max_before'] or math.nan:.3g} -> {stats['lambda_max_after'] or math.nan:.3g} | "
              f"{stats['seconds']:.1f} s, {stats['iterations']} iterations, {stats['trained_parameters']} parameters")
        results["runs"].append({"name": name, "ma_after": ma1, "asr_after": asr1, **stats})
    if len(results["runs"]) == 2:
        fip, fast = sorted(results["runs"], key=lambda r: r["fast"])
        print(f"Fast FIP speed-up: {fip['seconds'] / fast['seconds']:.1f}x")
    if args.out:
        import json

        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
