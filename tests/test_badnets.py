"""BadNets trigger: exact pixels and values, nothing else touched, poisoning counts and labels."""

from __future__ import annotations

import pytest
import torch

from attacks.badnets import SDFC12_COLS, SDFC12_ROWS, BadNets


def test_square_trigger_changes_exactly_its_patch_on_every_channel():
    x = torch.rand(4, 3, 32, 32) * 0.5
    out = BadNets(pattern="square", size=3, position="bottom_right", value=1.0).apply_trigger(x)
    changed = (out != x).any(0)  # (C, H, W)
    expected = torch.zeros(3, 32, 32, dtype=torch.bool)
    expected[:, 28:31, 28:31] = True  # one pixel from the border
    assert torch.equal(changed, expected)
    assert torch.all(out[:, :, 28:31, 28:31] == 1.0)
    assert torch.equal(out[~expected.expand(4, -1, -1, -1)], x[~expected.expand(4, -1, -1, -1)])


def test_checkerboard_alternates_value_and_zero():
    x = torch.full((1, 1, 28, 28), 0.5)
    out = BadNets(pattern="checkerboard", size=4, position="top_left", value=0.8).apply_trigger(x)
    patch = out[0, 0, 1:5, 1:5]
    expected = torch.tensor([[0.8, 0, 0.8, 0], [0, 0.8, 0, 0.8], [0.8, 0, 0.8, 0], [0, 0.8, 0, 0.8]])
    assert torch.allclose(patch, expected)
    assert int((out != x).sum()) == 16


def test_sdfc12_preset_sets_the_twelve_code_pixels_of_channel_zero():
    x = torch.zeros(2, 3, 32, 32)
    out = BadNets(pattern="sdfc12").apply_trigger(x)
    positions = {(int(r), int(c)) for r, c in (out[0, 0] != 0).nonzero()}
    assert positions == {(r, c) for r in SDFC12_ROWS for c in SDFC12_COLS}
    assert len(positions) == 12
    assert torch.all(out[:, 1:] == 0)  # channels 1 and 2 untouched


def test_explicit_position_and_values_stay_in_range():
    x = torch.rand(5, 1, 28, 28)
    out = BadNets(pattern="square", size=2, position=[10, 12], value=0.3).apply_trigger(x)
    assert torch.all(out[:, 0, 10:12, 12:14] == 0.3)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_poison_batch_triggers_and_relabels_the_configured_share():
    poison = BadNets(target_label=2, poison_ratio=0.5)
    x, y = torch.rand(64, 1, 28, 28) * 0.5, torch.zeros(64, dtype=torch.long)
    px, py, mask = poison.poison_batch(x, y, torch.Generator().manual_seed(0))
    assert int(mask.sum()) == 32
    assert torch.all(py[mask] == 2) and torch.all(py[~mask] == 0)
    assert torch.equal(px[~mask], x[~mask])
    assert torch.all(px[mask][:, :, 24:27, 24:27] == 1.0)
    # same generator seed, same choice; the inputs themselves are not modified in place
    _, _, mask2 = poison.poison_batch(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(mask, mask2) and torch.all(y == 0)


@pytest.mark.parametrize("kwargs", [{"pattern": "star"}, {"value": 1.5}, {"position": "middle"},
                                    {"poison_ratio": 1.2}])
def test_bad_trigger_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        BadNets(**kwargs)


def test_trigger_that_does_not_fit_is_rejected():
    with pytest.raises(ValueError, match="does not fit"):
        BadNets(size=40).apply_trigger(torch.zeros(1, 1, 28, 28))
