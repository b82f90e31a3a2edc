"""FIP / Fast FIP (strategies/fip.py): the sanity checks of the spec (§6) on tiny models and data."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from strategies.fip import (
    FIPConfig,
    Purifier,
    batch_indices,
    code_projection,
    fisher_penalty,
    hutchinson_penalty,
    merge_spectral_model,
    power_iteration,
    purification_enabled,
    purify,
    to_spectral_model,
    top_hessian_eigenvalue,
)
from task.data import InputSpec, to_unit_float

SPEC = InputSpec(mean=(0.5,), std=(0.25,), image_size=8, channels=1)


class TinyConvNet(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))


def tiny_images(n: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int64)
    x = rng.integers(0, 80, (n, 8, 8, 1)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, 2 * c:2 * c + 2, :, 0] = 230
    return x, y


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyConvNet()


def params_of(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def fip_config(**kw) -> FIPConfig:
    base = {"iterations": 6, "batch_size": 16, "lr": 0.05, "momentum": 0.9, "lambda_iterations": 0}
    return FIPConfig(**{**base, **kw})


def test_fip_without_regularizers_is_plain_fine_tuning():
    x, y = tiny_images()
    model = tiny_model()
    cfg = fip_config(eta_f=0.0, eta_r=0.0)
    purified, stats = purify(model, x, y, SPEC, cfg)

    # the reference: plain SGD on the clean cross-entropy over the same minibatches
    reference = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(reference.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    xs, ys = to_unit_float(x), torch.as_tensor(y)
    for idx in batch_indices(len(y), cfg.batch_size, cfg.iterations, torch.Generator().manual_seed(cfg.seed)):
        optimizer.zero_grad()
        F.cross_entropy(reference(SPEC.to_model_input(xs[idx])), ys[idx]).backward()
        optimizer.step()

    assert stats["iterations"] == cfg.iterations
    assert not torch.equal(params_of(purified), params_of(model))  # it did train
    torch.testing.assert_close(params_of(purified), params_of(reference))
    torch.testing.assert_close(purified.bn.running_mean, reference.bn.running_mean)
    # and the regularizers do change the result when switched on
    for kw in ({"eta_f": 1.0, "eta_r": 0.0}, {"eta_f": 0.0, "eta_r": 50.0}):
        other, _ = purify(model, x, y, SPEC, fip_config(**kw))
        assert not torch.allclose(params_of(other), params_of(reference))


def test_purify_leaves_its_input_model_unchanged_and_keeps_keys():
    x, y = tiny_images()
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    for fast in (False, True):
        purified, _ = purify(model, x, y, SPEC, fip_config(fast=fast, eta_f=0.5, eta_r=1.0))
        assert list(purified.state_dict()) == list(before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_fast_fip_with_zero_shift_reproduces_the_model():
    x, _ = tiny_images(16)
    model = tiny_model().eval()
    inputs = SPEC.to_model_input(to_unit_float(x))
    spectral, layers = to_spectral_model(model)
    spectral.eval()
    assert set(layers) == {"conv", "fc"}
    assert [n for n, p in spectral.named_parameters() if p.requires_grad] == ["conv.delta", "fc.delta"]
    with torch.no_grad():
        torch.testing.assert_close(spectral(inputs), model(inputs), atol=1e-5, rtol=0)
        merged = merge_spectral_model(model, layers)
        torch.testing.assert_close(merged(inputs), model(inputs), atol=1e-5, rtol=0)
        # a non-zero shift changes the outputs, and the merged plain model follows the wrapped one
        layers["fc"].delta.add_(0.3)
        merged = merge_spectral_model(model, layers)
        assert not torch.allclose(spectral(inputs), model(inputs), atol=1e-3)
        torch.testing.assert_close(merged(inputs), spectral(inputs), atol=1e-5, rtol=0)


def test_fast_fip_trains_only_the_singular_value_shift():
    x, y = tiny_images()
    model = tiny_model()
    purified, stats = purify(model, x, y, SPEC, fip_config(fast=True, eta_f=0.5, eta_r=1.0, lr=0.2))
    expected = sum(min(w.shape[0], w[0].numel()) for w in (model.conv.weight, model.fc.weight))
    assert stats["trained_parameters"] == expected
    torch.testing.assert_close(purified.conv.bias, model.conv.bias)  # biases and BatchNorm frozen
    torch.testing.assert_close(purified.bn.weight, model.bn.weight)
    torch.testing.assert_close(purified.bn.running_var, model.bn.running_var)
    assert not torch.allclose(purified.fc.weight, model.fc.weight)
    # the new weights keep the singular vectors: W' = U diag(S') Vᵀ
    u, _, vh = torch.linalg.svd(model.fc.weight.detach().double(), full_matrices=False)
    s_new = torch.diagonal(u.T @ purified.fc.weight.detach().double() @ vh.T)
    torch.testing.assert_close((u * s_new) @ vh, purified.fc.weight.detach().double(), atol=1e-5, rtol=0)


def test_hutchinson_estimate_approaches_the_fisher_penalty():
    torch.manual_seed(0)
    grads = [torch.randn(5, 3), torch.randn(7)]
    exact = float(fisher_penalty(grads))
    errors = {}
    for probes in (4, 64, 4096):
        estimates = [float(hutchinson_penalty(grads, probes, torch.Generator().manual_seed(s))) for s in range(20)]
        errors[probes] = float(np.mean(np.abs(np.array(estimates) / exact - 1)))
    assert errors[4096] < errors[64] < errors[4]
    assert errors[4096] < 0.05


def test_hutchinson_is_differentiable_like_the_fisher_penalty():
    # the gradient of the estimate w.r.t. g is unbiased for the gradient of ‖g‖² (= 2g)
    g = torch.randn(6, requires_grad=True)
    est = hutchinson_penalty([g], 20000, torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(est, g)
    torch.testing.assert_close(grad, 2 * g.detach(), atol=0.15 * float(g.detach().abs().max()) + 0.05, rtol=0.05)


def test_code_projection_is_zero_mean_and_weights_layers_by_cumsum():
    grads = [torch.ones(2), torch.ones(3)]
    gen = torch.Generator().manual_seed(0)
    values = torch.tensor([float(code_projection(grads, 1, gen)) for _ in range(4000)])
    assert abs(float(values.mean())) < 0.15
    # per probe: layer 1 counted twice (cumsum after layers 1 and 2), layer 2 once: Var = 4·2 + 1·3 = 11
    assert abs(float(values.var()) - 11.0) < 1.0


def tiny_regression_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(40, 3, generator=gen)
    y = torch.randint(0, 2, (40,), generator=gen)
    return model, x, y


def exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).double()

    def loss(theta: torch.Tensor) -> torch.Tensor:
        chunks, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            chunks[n] = theta[i:i + s.numel()].reshape(s)
            i += s.numel()
        return F.cross_entropy(functional_call(model.double(), chunks, (x.double(),)), y)

    hessian = torch.autograd.functional.hessian(loss, flat)
    model.float()
    return hessian


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_iteration_finds_the_top_hessian_eigenvalue(seed):
    model, x, y = tiny_regression_problem(seed)
    eigenvalues = torch.linalg.eigvalsh(exact_hessian(model, x, y))
    dominant = float(eigenvalues[eigenvalues.abs().argmax()])
    estimate = top_hessian_eigenvalue(model.double(), x.double(), y, iterations=500, seed=seed, batch_size=16)
    assert estimate == pytest.approx(dominant, rel=1e-3)
    assert eigenvalues.max() > 0


def test_power_iteration_on_a_known_matrix():
    matrix = torch.diag(torch.tensor([5.0, 2.0, -1.0, 0.5]))
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
    h = q @ matrix @ q.T
    value = power_iteration(lambda v: [h @ v[0]], [torch.zeros(4)], iterations=200,
                            generator=torch.Generator().manual_seed(0), tol=1e-9)
    assert value == pytest.approx(5.0, rel=1e-4)


def test_purify_reports_sharpness_before_and_after():
    x, y = tiny_images()
    _, stats = purify(tiny_model(), x, y, SPEC, fip_config(lambda_iterations=5, lambda_samples=32))
    assert stats["lambda_max_before"] > 0 and stats["lambda_max_after"] > 0
    assert stats["lambda_max_before"] != stats["lambda_max_after"]


def test_code_impl_runs_without_retainer_and_hutchinson_variant_runs():
    x, y = tiny_images()
    _, code_stats = purify(tiny_model(), x, y, SPEC, fip_config(impl="code", code_iter_gap=2, code_probes=3))
    assert code_stats["mean_retainer"] == 0.0 and code_stats["mean_suppressor"] != 0.0
    _, hutch = purify(tiny_model(), x, y, SPEC, fip_config(trace="hutchinson", probes=3))
    assert hutch["mean_suppressor"] > 0 and hutch["mean_retainer"] >= 0


def test_config_validation_and_schedule():
    with pytest.raises(ValueError, match="purification.impl"):
        FIPConfig(impl="paperish")
    with pytest.raises(ValueError, match="unknown purification keys"):
        FIPConfig.from_mapping({"eta_q": 1})
    final = Purifier({"name": "fip", "when": "final"})
    assert [r for r in range(1, 11) if final.due(r, 10)] == [10]
    every = Purifier({"name": "fip", "when": "every", "every": 3, "start_round": 2})
    assert [r for r in range(1, 11) if every.due(r, 10)] == [2, 5, 8]
    with pytest.raises(ValueError, match="purification.when"):
        Purifier({"name": "fip", "when": "sometimes"})


def test_purification_config_group_and_server_split_check():
    from server.app import check_run
    from task.config import ConfigError, compose_config

    assert not purification_enabled(compose_config(""))
    cfg = compose_config("purification=fip")
    assert purification_enabled(cfg) and Purifier.from_run_config(cfg).config == FIPConfig.from_mapping(
        {k: v for k, v in cfg.purification.items()} | {"seed": 0})
    with pytest.raises(ConfigError, match="server.val_fraction"):
        check_run(compose_config("purification=fip server.val_fraction=0"))
    check_run(compose_config("server.val_fraction=0"))  # no purification: no split needed


def test_server_hook_purifies_a_state_dict_and_reports_a_purify_row():
    x, y = tiny_images()
    model = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    purifier = Purifier({"name": "fip", "when": "final", "iterations": 4, "batch_size": 16, "lr": 0.05,
                         "lambda_iterations": 3, "lambda_samples": 16})
    purifier.attach(x, y, SPEC, torch.device("cpu"), (x[:16], y[:16]))
    calls = []

    def evaluate(net):
        calls.append(params_of(net))
        return 0.5, 0.25

    new_state, row = purifier.purify_state(tiny_model(seed=1), state, 10, evaluate)
    assert list(new_state) == list(state)
    assert not torch.equal(new_state["fc.weight"], state["fc.weight"])
    assert row["phase"] == "purify" and row["round"] == 10 and row["method"] == "fip"
    assert {"ma_before", "asr_before", "ma_after", "asr_after", "lambda_max_before", "lambda_max_after",
            "t_purify"} <= set(row)
    # evaluated before (on the loaded global state) and after (on the purified model)
    torch.testing.assert_close(calls[0], params_of(model))
    torch.testing.assert_close(calls[1], torch.cat([new_state[k].flatten() for k, _ in model.named_parameters()]))
    with pytest.raises(ValueError, match="server.val_fraction"):
        purifier.attach(x[:0], y[:0], SPEC, torch.device("cpu"), None)
