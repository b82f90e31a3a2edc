"""Trigger attacks beyond BadNets: the exact pixel change of each trigger (recomputed here from its
formula), value range, seeded determinism, poisoning counts and labels, DBA parts, and the presets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from attacks.badnets import BadNets
from attacks.blended import Blended
from attacks.dba import DBA
from attacks.label_flip import LabelFlip
from attacks.semantic import SemanticBackdoor
from attacks.sig import SIG
from attacks.wanet import WaNet
from task.config import compose_config


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- Blended

def test_blended_is_the_convex_mix_with_the_seeded_noise_pattern():
    x = torch.rand(3, 2, 5, 6, generator=gen(1))
    poison = Blended(alpha=0.25, pattern="noise", seed=7)
    pattern = poison.pattern_image(2, 5, 6)
    # the pattern is the uniform noise of a generator seeded with `seed`
    assert torch.equal(pattern, torch.rand(2, 5, 6, generator=gen(7)))
    out = poison.apply_trigger(x)
    assert torch.allclose(out, 0.75 * x + 0.25 * pattern[None], atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x) and torch.equal(x, torch.rand(3, 2, 5, 6, generator=gen(1)))  # not in place


def test_blended_noise_pattern_is_deterministic_per_seed():
    a, b, c = Blended(seed=3), Blended(seed=3), Blended(seed=4)
    assert torch.equal(a.pattern_image(1, 8, 8), b.pattern_image(1, 8, 8))
    assert not torch.equal(a.pattern_image(1, 8, 8), c.pattern_image(1, 8, 8))
    assert a.pattern_image(1, 8, 8) is a.pattern_image(1, 8, 8)  # cached per shape


def test_blended_stripes_are_diagonal_and_identical_on_every_channel():
    pattern = Blended(pattern="stripes").pattern_image(3, 6, 6)
    for i in range(6):
        for j in range(6):
            assert float(pattern[0, i, j]) == (1.0 if ((i + j) // 2) % 2 == 0 else 0.0)
    assert torch.equal(pattern[0], pattern[1]) and torch.equal(pattern[0], pattern[2])
    # constant along anti-diagonals: shifting one row down and one column left gives the same value
    assert torch.equal(pattern[0, 1:, :-1], pattern[0, :-1, 1:])


def test_blended_trains_with_alpha_and_tests_with_test_alpha():
    x = torch.full((8, 1, 4, 4), 0.5)
    y = torch.zeros(8, dtype=torch.long)
    poison = Blended(target_label=5, poison_ratio=0.5, alpha=0.1, test_alpha=0.6, pattern="stripes")
    pattern = poison.pattern_image(1, 4, 4)
    px, py, mask = poison.poison_batch(x, y, gen())
    assert int(mask.sum()) == 4
    assert torch.all(py[mask] == 5) and torch.all(py[~mask] == 0)
    assert torch.allclose(px[mask], 0.9 * x[mask] + 0.1 * pattern, atol=1e-6)
    assert torch.equal(px[~mask], x[~mask])
    assert torch.allclose(poison.apply_trigger(x), 0.4 * x + 0.6 * pattern, atol=1e-6)


# ---------------------------------------------------------------- SIG

def test_sig_adds_the_horizontal_sinusoid_to_every_channel_and_clips():
    height, width, delta, freq = 4, 10, 20 / 255, 3
    x = torch.rand(2, 3, height, width, generator=gen(2))
    x[0, 0, 0, :] = 0.99  # near white: the positive half of the wave must be clipped at 1
    x[1, 1, 2, :] = 0.0   # black: the negative half must be clipped at 0
    out = SIG(delta=delta, frequency=freq).apply_trigger(x)
    expected = x.clone()
    for j in range(width):
        expected[..., j] += delta * math.sin(2 * math.pi * j * freq / width)
    expected = expected.clamp(0, 1)
    assert torch.allclose(out, expected, atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.all(out[0, 0, 0] <= 1.0) and torch.any(out[0, 0, 0] == 1.0)
    # the signal is the same on every row: column 0 (sin 0 = 0) is unchanged
    assert torch.allclose(out[..., 0], x[..., 0])


def test_sig_dirty_label_relabels_a_share_of_the_batch():
    x, y = torch.full((10, 1, 6, 10), 0.5), torch.arange(10) % 3
    px, py, mask = SIG(target_label=2, poison_ratio=0.3, frequency=3).poison_batch(x, y, gen())
    assert int(mask.sum()) == 3 and torch.all(py[mask] == 2) and torch.equal(py[~mask], y[~mask])
    assert torch.equal(px[~mask], x[~mask]) and not torch.equal(px[mask], x[mask])


def test_sig_clean_label_stamps_only_target_class_samples_and_keeps_labels():
    y = torch.tensor([2, 0, 2, 1, 2, 2, 3, 2])  # five samples of the target class 2
    x = torch.full((8, 1, 6, 10), 0.5)
    px, py, mask = SIG(target_label=2, poison_ratio=0.6, frequency=3, clean_label=True).poison_batch(x, y, gen())
    assert int(mask.sum()) == 3  # round(0.6 * 5)
    assert torch.all(y[mask] == 2)
    assert torch.equal(py, y)
    changed = (px != x).flatten(1).any(1)
    assert torch.equal(changed, mask)


# ---------------------------------------------------------------- WaNet

def ramp_image(height: int, width: int) -> torch.Tensor:
    """Channel 0 = column / (W-1), channel 1 = row / (H-1): bilinear sampling of a linear image returns the
    sampled position itself, so warping it reveals the sampling grid."""
    cols = torch.arange(width, dtype=torch.float32) / (width - 1)
    rows = torch.arange(height, dtype=torch.float32) / (height - 1)
    return torch.stack((cols.expand(height, -1), rows[:, None].expand(-1, width)))[None]


def test_wanet_warp_matches_the_formula():
    height = width = 8
    k, s = 3, 2.0
    poison = WaNet(k=k, s=s, seed=5)
    control = poison.control_grid
    assert control.shape == (1, 2, k, k)
    assert torch.isclose(control.abs().mean(), torch.tensor(1.0))
    raw = torch.rand(1, 2, k, k, generator=gen(5)) * 2 - 1
    assert torch.allclose(control, raw / raw.abs().mean())
    # independent grid: identity + s * bicubic(P) / H, clamped
    field = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True)
    expected = torch.empty(2, height, width)
    for i in range(height):
        for j in range(width):
            gx = -1 + 2 * j / (width - 1) + s * float(field[0, 0, i, j]) / height
            gy = -1 + 2 * i / (height - 1) + s * float(field[0, 1, i, j]) / height
            expected[0, i, j] = min(max(gx, -1.0), 1.0)
            expected[1, i, j] = min(max(gy, -1.0), 1.0)
    out = poison.apply_trigger(ramp_image(height, width))
    # the warped ramp is the sampled position, mapped from [-1, 1] to [0, 1]
    assert torch.allclose(out[0], (expected + 1) / 2, atol=1e-5)
    assert not torch.allclose(out, ramp_image(height, width), atol=1e-3)


def test_wanet_stays_in_range_and_is_deterministic_per_seed():
    x = torch.rand(4, 3, 16, 16, generator=gen(3))
    a, b, c = WaNet(seed=1), WaNet(seed=1), WaNet(seed=2)
    out = a.apply_trigger(x)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, b.apply_trigger(x))
    assert not torch.equal(out, c.apply_trigger(x))


def test_wanet_with_zero_strength_is_the_identity():
    x = torch.rand(3, 3, 12, 12, generator=gen(4))
    assert torch.allclose(WaNet(s=0.0).apply_trigger(x), x, atol=1e-6)


def test_wanet_poison_batch_relabels_triggers_and_keeps_labels_of_noise_mode_samples():
    n = 20
    x = torch.rand(n, 1, 10, 10, generator=gen(6))
    y = torch.arange(n) % 2
    poison = WaNet(target_label=7, poison_ratio=0.25, noise_ratio=0.5, s=4.0)
    px, py, mask = poison.poison_batch(x, y, gen())
    assert int(mask.sum()) == 5
    assert torch.all(py[mask] == 7) and torch.equal(py[~mask], y[~mask])
    assert torch.allclose(px[mask], poison.apply_trigger(x[mask]))
    changed = (px != x).flatten(1).any(1)
    noise_mode = changed & ~mask
    assert int(noise_mode.sum()) == 10  # round(0.5 * 20) of the non-poisoned samples, labels kept
    assert int((~changed).sum()) == 5
    # noise-mode samples differ from the exact trigger warp (random grid noise)
    assert not torch.allclose(px[noise_mode], poison.apply_trigger(x[noise_mode]), atol=1e-4)
    assert px.min() >= 0 and px.max() <= 1


def test_wanet_noise_count_is_capped_by_the_unpoisoned_samples():
    x, y = torch.rand(10, 1, 8, 8, generator=gen(8)), torch.zeros(10, dtype=torch.long)
    px, py, mask = WaNet(poison_ratio=0.8, noise_ratio=0.5).poison_batch(x, y, gen())
    assert int(mask.sum()) == 8 and bool((px != x).flatten(1).any(1).all())


# ---------------------------------------------------------------- DBA

def test_dba_default_layout_is_four_bars_near_the_top_left():
    poison = DBA()
    expected = {0: (1, range(1, 5)), 1: (1, range(7, 11)), 2: (3, range(1, 5)), 3: (3, range(7, 11))}
    for part, (row, cols) in expected.items():
        pixels = {(int(r), int(c)) for r, c in poison.part_mask(part, 1, 28, 28)[0].nonzero()}
        assert pixels == {(row, c) for c in cols}
    assert poison.global_mask(3, 28, 28).sum() == 3 * 16


def test_dba_parts_are_disjoint_and_their_union_is_the_global_trigger():
    poison = DBA(num_parts=4, size=3, gap=2)
    masks = [poison.part_mask(p, 3, 32, 32) for p in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.any(masks[a] & masks[b])
    union = masks[0] | masks[1] | masks[2] | masks[3]
    assert torch.equal(union, poison.global_mask(3, 32, 32))


def test_dba_global_trigger_changes_exactly_its_pixels():
    x = torch.rand(4, 3, 28, 28, generator=gen(9)) * 0.5
    poison = DBA(value=0.9)
    out = poison.apply_trigger(x)
    mask = poison.global_mask(3, 28, 28)
    assert torch.equal((out != x).any(0), mask)
    assert torch.all(out[:, mask] == 0.9)
    assert torch.equal(out[:, ~mask], x[:, ~mask])


def test_dba_attacker_stamps_only_its_part():
    poison = DBA(num_parts=4, target_label=3, poison_ratio=0.5)
    x = torch.zeros(2, 1, 28, 28)
    local = poison.for_attacker(5)  # 5 % 4 = part 1
    out = local.apply_trigger(x)
    assert torch.equal(out[0] != 0, poison.part_mask(1, 1, 28, 28))
    assert torch.equal(out[1] != 0, poison.part_mask(1, 1, 28, 28))
    assert (local.target_label, local.poison_ratio) == (3, 0.5)
    px, py, mask = local.poison_batch(torch.zeros(8, 1, 28, 28), torch.zeros(8, dtype=torch.long), gen())
    assert int(mask.sum()) == 4 and torch.all(py[mask] == 3)
    assert torch.equal(px[mask][0, 0] != 0, poison.part_mask(1, 1, 28, 28)[0])
    # the ASR uses the global trigger
    assert torch.equal(poison.apply_trigger(x)[0] != 0, poison.global_mask(1, 28, 28))


def test_dba_trigger_that_does_not_fit_is_rejected():
    with pytest.raises(ValueError, match="does not fit"):
        DBA(size=8, col=10).apply_trigger(torch.zeros(1, 1, 20, 20))


# ---------------------------------------------------------------- semantic backdoor

def test_semantic_noises_and_relabels_only_source_class_samples():
    y = torch.tensor([3, 1, 3, 3, 0, 3, 2, 3])  # five of the source class 3
    x = torch.full((8, 1, 6, 6), 0.5)
    poison = SemanticBackdoor(source_label=3, target_label=2, sigma=0.05, poison_ratio=0.6)
    px, py, mask = poison.poison_batch(x, y, gen())
    assert int(mask.sum()) == 3 and torch.all(y[mask] == 3)
    assert torch.all(py[mask] == 2) and torch.equal(py[~mask], y[~mask])
    assert torch.equal((px != x).flatten(1).any(1), mask)
    assert px.min() >= 0 and px.max() <= 1
    assert 0.02 < float((px[mask] - x[mask]).std()) < 0.08
    # default ratio 1.0: every source sample
    _, py_all, mask_all = SemanticBackdoor().poison_batch(x, y, gen())
    assert torch.equal(mask_all, y == 3) and torch.all(py_all[y == 3] == 2)


def test_semantic_test_trigger_is_seeded_noise_clamped_to_range():
    x = torch.rand(4, 1, 6, 6, generator=gen(10))
    poison = SemanticBackdoor(sigma=0.1, seed=4)
    out = poison.apply_trigger(x)
    expected = (x + torch.randn(x.shape, generator=gen(4)) * 0.1).clamp(0, 1)
    assert torch.allclose(out, expected)
    assert torch.equal(out, poison.apply_trigger(x))
    assert not torch.equal(out, SemanticBackdoor(sigma=0.1, seed=5).apply_trigger(x))


def test_semantic_and_label_flip_measure_asr_on_the_source_class():
    y = np.array([0, 1, 2, 3, 3, 2, 0])
    for exclude in (True, False):
        assert np.array_equal(SemanticBackdoor(source_label=3).asr_mask(y, exclude), y == 3)
        assert np.array_equal(LabelFlip(source_label=0).asr_mask(y, exclude), y == 0)


# ---------------------------------------------------------------- label flip

def test_label_flip_changes_only_labels_of_source_class_samples():
    y = torch.tensor([0, 1, 0, 0, 2, 0])
    x = torch.rand(6, 1, 5, 5, generator=gen(11))
    px, py, mask = LabelFlip(source_label=0, target_label=2, poison_ratio=0.5).poison_batch(x, y, gen())
    assert int(mask.sum()) == 2 and torch.all(y[mask] == 0)
    assert torch.all(py[mask] == 2) and torch.equal(py[~mask], y[~mask])
    assert torch.equal(px, x)
    assert torch.equal(y, torch.tensor([0, 1, 0, 0, 2, 0]))  # not in place
    out = LabelFlip().apply_trigger(x)
    assert torch.equal(out, x) and out is not x


# ---------------------------------------------------------------- validation and presets

@pytest.mark.parametrize("cls, kwargs, key", [
    (Blended, {"alpha": 1.5}, "alpha"), (Blended, {"test_alpha": 0.0}, "test_alpha"),
    (Blended, {"pattern": "kitty"}, "pattern"), (SIG, {"delta": 0.0}, "delta"),
    (SIG, {"frequency": -1}, "frequency"), (WaNet, {"k": 1}, "k"), (WaNet, {"s": -0.1}, "s"),
    (WaNet, {"noise_ratio": 1.5}, "noise_ratio"), (WaNet, {"grid_rescale": 0}, "grid_rescale"),
    (DBA, {"gap": 0}, "gap"), (DBA, {"num_parts": 0}, "num_parts"), (DBA, {"value": 2.0}, "value"),
    (SemanticBackdoor, {"sigma": -1.0}, "sigma"), (SemanticBackdoor, {"source_label": 2}, "source_label"),
    (LabelFlip, {"source_label": 2}, "source_label"),
])
def test_bad_settings_are_rejected_naming_the_key(cls, kwargs, key):
    with pytest.raises(ValueError, match=f"attack.poison.{key}="):
        cls(**kwargs)


@pytest.mark.parametrize("name, cls", [
    ("blended", Blended), ("sig", SIG), ("wanet", WaNet), ("dba", DBA), ("semantic", SemanticBackdoor),
    ("label_flip", LabelFlip), ("badnets_checkerboard", BadNets),
])
def test_each_preset_composes_and_instantiates(name, cls):
    cfg = compose_config(f"attack={name}")
    assert cfg.attack.name == name and cfg.attack.fraction == 0.3
    poison = instantiate(cfg.attack.poison)
    assert type(poison) is cls
    out = poison.apply_trigger(torch.rand(2, 1, 28, 28, generator=gen()))
    assert out.shape == (2, 1, 28, 28) and out.min() >= 0 and out.max() <= 1
    if name == "badnets_checkerboard":
        assert poison.pattern == "checkerboard"
