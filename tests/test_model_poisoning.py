"""Model-poisoning attacks: scaling arithmetic, PGD projection, Neurotoxin's mask and memory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks.neurotoxin import MEMORY_KEY, Neurotoxin, neurotoxin_mask
from attacks.pgd import PGDConstrain, parameter_keys
from attacks.scaling import Scaling


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bn(self.fc(x))))


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def param_distance(model: nn.Module, global_state: dict[str, torch.Tensor]) -> float:
    total = sum(float(((p.detach() - global_state[n]) ** 2).sum()) for n, p in model.named_parameters())
    return math.sqrt(total)


def state_param_distance(state: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(((state[k] - global_state[k]) ** 2).sum()) for k in parameter_keys(global_state)))


def perturbed_state(global_state: dict[str, torch.Tensor], seed: int, size: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in global_state.items():
        out[k] = v + size * torch.randn(v.shape, generator=gen) if torch.is_floating_point(v) else v + 7
    return out


# ---- Scaling ---------------------------------------------------------------------------------------

def test_scaling_is_global_plus_gamma_times_update_exactly():
    g = {"w": torch.tensor([1.0, 2.0, -1.0]), "bn.running_var": torch.tensor([1.0, 1.0]),
         "bn.num_batches_tracked": torch.tensor(5)}
    local = {"w": torch.tensor([1.5, 1.0, -1.0]), "bn.running_var": torch.tensor([2.0, 0.5]),
             "bn.num_batches_tracked": torch.tensor(9)}
    out = Scaling(gamma=4.0).after_training(g, local)
    assert torch.equal(out["w"], torch.tensor([3.0, -2.0, -1.0]))  # 1 + 4*0.5, 2 + 4*(-1), -1 + 0
    assert torch.equal(out["bn.running_var"], torch.tensor([5.0, -1.0]))  # running statistics scaled too
    assert torch.equal(out["bn.num_batches_tracked"], torch.tensor(9))  # integer buffer: the local one, untouched
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert list(out) == list(local)


def test_scaling_default_gamma_is_num_clients_over_server_lr():
    assert Scaling(num_clients=10).gamma == 10.0
    assert Scaling(num_clients=10, server_lr=0.5).gamma == 20.0
    assert Scaling(gamma=3.0, num_clients=10).gamma == 3.0  # an explicit gamma wins
    g = {"w": torch.zeros(2)}
    out = Scaling(num_clients=8, server_lr=2.0).after_training(g, {"w": torch.tensor([1.0, -0.5])})
    assert torch.equal(out["w"], torch.tensor([4.0, -2.0]))
    with pytest.raises(ValueError, match="num_clients"):
        Scaling()
    with pytest.raises(ValueError, match="server_lr"):
        Scaling(num_clients=10, server_lr=0.0)


def test_scaling_on_a_real_state_dict_passes_integer_buffers_through():
    torch.manual_seed(0)
    model = SmallNet()
    g = clone_state(model)
    local = perturbed_state(g, seed=1, size=0.1)
    out = Scaling(gamma=10.0).after_training(g, local)
    for k, v in g.items():
        if torch.is_floating_point(v):
            assert torch.allclose(out[k], v + 10.0 * (local[k] - v), atol=1e-6)
        else:
            assert torch.equal(out[k], local[k])


# ---- PGD -------------------------------------------------------------------------------------------

def test_pgd_projection_never_leaves_the_ball():
    torch.manual_seed(0)
    model = SmallNet()
    g = clone_state(model)
    attack = PGDConstrain(epsilon=0.5)
    attack.before_training(g, {})
    for seed in range(5):
        model.load_state_dict(perturbed_state(g, seed=seed, size=1.0))
        assert param_distance(model, g) > 0.5
        attack.after_step(model, g)
        assert param_distance(model, g) <= 0.5 + 1e-6
        assert param_distance(model, g) == pytest.approx(0.5, rel=1e-5)  # projected onto the sphere


def test_pgd_leaves_a_model_inside_the_ball_untouched():
    torch.manual_seed(0)
    model = SmallNet()
    g = clone_state(model)
    inside = perturbed_state(g, seed=3, size=1e-3)
    model.load_state_dict(inside)
    before = clone_state(model)
    attack = PGDConstrain(epsilon=2.0)
    attack.before_training(g, {})
    attack.after_step(model, g)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    out = attack.after_training(g, before)
    for k, v in before.items():
        assert torch.equal(out[k], v)


def test_pgd_does_not_touch_buffers_and_projects_the_upload():
    torch.manual_seed(0)
    model = SmallNet()
    g = clone_state(model)
    local = perturbed_state(g, seed=2, size=1.0)
    out = PGDConstrain(epsilon=0.3).after_training(g, local)
    assert state_param_distance(out, g) <= 0.3 + 1e-6
    for k in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(out[k], local[k])
    scaled = PGDConstrain(epsilon=0.3, scale=5.0).after_training(g, local)
    assert state_param_distance(scaled, g) == pytest.approx(5 * 0.3, rel=1e-5)
    assert torch.equal(scaled["bn.num_batches_tracked"], local["bn.num_batches_tracked"])
    assert torch.allclose(scaled["bn.running_mean"], g["bn.running_mean"] + 5 * (local["bn.running_mean"]
                                                                                  - g["bn.running_mean"]))


def test_pgd_training_loop_stays_inside_the_ball():
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    g = clone_state(model)
    attack = PGDConstrain(epsilon=0.1)
    attack.before_training(g, {})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x, y = torch.randn(32, 2), torch.randint(0, 2, (32,))
    for _ in range(50):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        attack.after_step(model, g)
        assert param_distance(model, g) <= 0.1 + 1e-6
    assert param_distance(model, g) > 0.05  # it did train, up to the boundary
    assert attack.steps == 50


def test_pgd_projects_every_k_steps_and_resets_the_counter():
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    g = clone_state(model)
    attack = PGDConstrain(epsilon=0.1, project_every=3)
    attack.before_training(g, {})
    far = perturbed_state(g, seed=0, size=1.0)
    for step in range(1, 7):
        model.load_state_dict(far)
        attack.after_step(model, g)
        inside = param_distance(model, g) <= 0.1 + 1e-6
        assert inside == (step % 3 == 0)
    attack.before_training(g, {})
    assert attack.steps == 0
    with pytest.raises(ValueError):
        PGDConstrain(epsilon=0.0)
    with pytest.raises(ValueError):
        PGDConstrain(project_every=0)


# ---- Neurotoxin ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("d", "ratio"), [(10, 0.1), (10, 0.25), (1000, 0.1), (7, 0.5), (5, 0.0), (5, 1.0)])
def test_neurotoxin_mask_keeps_exactly_the_configured_fraction(d, ratio):
    delta = torch.randn(d, generator=torch.Generator().manual_seed(d))
    mask = neurotoxin_mask(delta, ratio)
    assert mask.dtype == torch.bool and mask.shape == (d,)
    frozen = round(ratio * d)
    assert int(mask.sum()) == d - frozen
    assert float(mask.float().mean()) == pytest.approx(1 - frozen / d)
    if 0 < frozen < d:  # the frozen coordinates are the largest |delta|
        assert float(delta.abs()[~mask].min()) >= float(delta.abs()[mask].max())


def test_neurotoxin_mask_freezes_the_largest_magnitudes():
    delta = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 1.0, -0.05, 0.4, 0.6])
    mask = neurotoxin_mask(delta, 0.2)  # round(0.2 * 10) = 2 frozen: |-5| and |2|
    assert mask.tolist() == [True, False, True, False, True, True, True, True, True, True]
    with pytest.raises(ValueError):
        neurotoxin_mask(delta, 1.5)


def train_steps(model: nn.Module, attack: Neurotoxin, g: dict[str, torch.Tensor], steps: int = 20) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, generator=gen), torch.randint(0, 2, (16,), generator=gen)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        attack.after_step(model, g)


def test_neurotoxin_two_rounds_with_memory():
    torch.manual_seed(0)
    model = SmallNet()
    memory: dict[str, torch.Tensor] = {}
    attack = Neurotoxin(topk_ratio=0.25)
    keys = parameter_keys(model.state_dict())
    d = sum(model.state_dict()[k].numel() for k in keys)

    # Round 1: no previous global model -> no mask, every parameter may move.
    g1 = clone_state(model)
    attack.before_training(g1, memory)
    assert attack.masks is None
    assert list(memory) == [MEMORY_KEY]
    assert memory[MEMORY_KEY].dtype == torch.float32 and memory[MEMORY_KEY].shape == (d,)
    train_steps(model, attack, g1)
    moved = torch.cat([(model.state_dict()[k] != g1[k]).reshape(-1) for k in keys])
    assert bool(moved.all())
    upload = attack.after_training(g1, clone_state(model))
    assert all(torch.equal(upload[k], v) for k, v in model.state_dict().items())

    # Between rounds the global model moves (the benign update); the client restarts from it.
    g2 = perturbed_state(g1, seed=5, size=0.1)
    g2["bn.num_batches_tracked"] = g1["bn.num_batches_tracked"]
    model.load_state_dict(g2)
    attack.before_training(g2, memory)
    delta = torch.cat([(g2[k] - g1[k]).reshape(-1) for k in keys])
    expected = neurotoxin_mask(delta, 0.25)
    assert attack.masks is not None
    assert torch.equal(torch.cat([attack.masks[k].reshape(-1) for k in keys]), expected)
    assert int((~expected).sum()) == round(0.25 * d)
    assert list(memory) == [MEMORY_KEY]
    assert torch.equal(memory[MEMORY_KEY], torch.cat([g2[k].reshape(-1) for k in keys]))

    train_steps(model, attack, g2)
    after = torch.cat([model.state_dict()[k].reshape(-1) for k in keys])
    start = torch.cat([g2[k].reshape(-1) for k in keys])
    assert torch.equal(after[~expected], start[~expected])  # frozen coordinates stayed at the global values
    assert bool((after[expected] != start[expected]).any())  # the others trained
    upload = attack.after_training(g2, clone_state(model))
    uploaded = torch.cat([upload[k].reshape(-1) for k in keys])
    assert torch.equal(uploaded[~expected], start[~expected])
    assert torch.equal(upload["bn.num_batches_tracked"], model.state_dict()["bn.num_batches_tracked"])


def test_neurotoxin_discards_a_previous_global_of_the_wrong_size():
    model = SmallNet()
    memory = {MEMORY_KEY: torch.zeros(3)}
    attack = Neurotoxin()
    attack.before_training(clone_state(model), memory)
    assert attack.masks is None
    assert memory[MEMORY_KEY].numel() == sum(p.numel() for p in model.parameters())
