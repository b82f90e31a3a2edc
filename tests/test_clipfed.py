"""CLIP-Fed (strategies/clipfed.py, task/teacher.py, task/frequency.py): augmentations, scores, losses,
the teacher's offline contract, and one real `flwr run` with a tiny random-weight open_clip teacher."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from strategies.base import ClientUpdate
from strategies.clipfed import (
    ClipFedStrategy,
    distillation_loss,
    kl_scores,
    load_image_folder,
    mad_cut,
    prototype_contrastive_loss,
    soft_weights,
)
from task.frequency import (
    amp_mix,
    dct2,
    dct_high_band,
    fft_high_band,
    frequency_augment,
    high_pass_pattern,
    idct2,
    patch,
)
from task.teacher import OpenClipTeacher, TeacherCheckpointMissing

# A tiny open_clip architecture: random weights, no download, a fraction of a second to build.
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def mid_grey_images(n: int = 4, c: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    # values in [0.3, 0.7] and small perturbations: the final clamp to [0, 1] never acts
    g = torch.Generator().manual_seed(seed)
    return 0.3 + 0.4 * torch.rand(n, c, size, size, generator=g, dtype=torch.float64)


# ---- frequency augmentations ----------------------------------------------------------------------
def test_dct_round_trip_is_orthonormal():
    x = mid_grey_images()
    assert torch.allclose(idct2(dct2(x)), x, atol=1e-12)
    assert torch.allclose(dct2(x).square().sum(), x.square().sum())  # energy preserved


def test_hf_noise_changes_the_high_dct_band_only():
    x = mid_grey_images()
    out = frequency_augment(x, "hf_noise", torch.Generator().manual_seed(1), cutoff=0.5, strength=0.01)
    diff = (dct2(out) - dct2(x)).abs()
    band = dct_high_band(16, 16, 0.5)
    assert diff[..., ~band].max() < 1e-10          # the low band is untouched
    assert (diff[..., band] > 1e-6).float().mean() > 0.99  # every high-band coefficient moved
    assert diff[..., band].mean() == pytest.approx(0.01 * (2 / np.pi) ** 0.5, rel=0.1)  # E|N(0, σ²)|


def test_amp_mix_changes_the_high_fft_amplitudes_only_and_keeps_the_phase():
    x = mid_grey_images(n=3)
    partner = mid_grey_images(n=3, seed=5)
    out = amp_mix(x, torch.Generator().manual_seed(2), cutoff=0.25, mix_max=0.8, partner=partner)
    fx, fo, fp = torch.fft.fft2(x), torch.fft.fft2(out), torch.fft.fft2(partner)
    band = fft_high_band(16, 16, 0.25)
    assert torch.allclose(fo[..., ~band], fx[..., ~band], atol=1e-10)
    # in the band: amplitude = (1-λ)|X| + λ|X_p| with one λ per image, phase of X
    lam = ((fo.abs() - fx.abs()) / (fp.abs() - fx.abs()))[..., band]
    for i in range(3):
        assert torch.allclose(lam[i], lam[i].median().expand_as(lam[i]), atol=1e-6)
        assert 0.0 < float(lam[i].median()) <= 0.8
    assert torch.allclose(torch.angle(fo)[..., band], torch.angle(fx)[..., band], atol=1e-6)
    assert out.dtype == x.dtype and torch.isreal(out).all()


def test_patch_is_local_and_high_pass():
    pattern = high_pass_pattern(6, torch.Generator().manual_seed(3), cutoff=0.5, strength=0.2)
    coeffs = dct2(pattern)
    low = ~dct_high_band(6, 6, 0.5)
    assert coeffs[low].abs().max() < 1e-10 and abs(float(pattern.mean())) < 1e-10  # no DC, no low band
    assert float(pattern.abs().max()) == pytest.approx(0.2)
    x = mid_grey_images(n=5)
    out = patch(x, torch.Generator().manual_seed(4), size=6, strength=0.2)
    for i in range(5):
        changed = (out[i] - x[i]).abs().amax(0) > 0
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        assert 0 < len(rows) and rows.max() - rows.min() < 6 and cols.max() - cols.min() < 6  # inside one 6x6 window


def test_unknown_augmentation_is_refused():
    with pytest.raises(ValueError, match="allowed: hf_noise, amp_mix, patch"):
        frequency_augment(mid_grey_images(), "jpeg", torch.Generator())


# ---- screening -----------------------------------------------------------------------------------------
def test_kl_score_ranks_a_backdoored_model_above_a_clean_one():
    # Hand-made: inputs are 4 class features plus a trigger feature. The teacher (and the clean model)
    # follow the class features; the backdoored model is the same but sends the trigger to class 2.
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=g)
    x = F.one_hot(labels, 5).double() * 3 + 0.1 * torch.randn(200, 5, generator=g, dtype=torch.float64)
    x[100:, 4] = 1.0                                  # the trigger-like (augmented) half
    w_clean = torch.cat([torch.eye(4), torch.zeros(1, 4)]).double()
    w_backdoor = w_clean.clone()
    w_backdoor[4, 2] = 8.0                            # trigger -> target class 2
    w_noisy = w_clean + 0.05 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    teacher = x @ w_clean
    scores = kl_scores(teacher, torch.stack([x @ w_clean, x @ w_noisy, x @ w_backdoor]), temperature=3.0)
    assert scores[0] < scores[2] and scores[1] < scores[2]
    # scored on the trigger-like half only, the gap widens
    half = kl_scores(teacher[100:], torch.stack([x[100:] @ w_noisy, x[100:] @ w_backdoor]), 3.0)
    assert half[1] - half[0] > scores[2] - scores[1]


def test_mad_cut_rejects_the_outliers_only_and_soft_weights_shrink_them():
    scores = torch.tensor([0.10, 0.12, 0.11, 0.13, 0.09, 0.12, 0.10, 0.60, 0.70, 0.65])
    rejected, threshold = mad_cut(scores, kappa=2.0)
    assert rejected.tolist() == [False] * 7 + [True] * 3
    assert 0.13 < threshold < 0.6
    assert not mad_cut(torch.full((5,), 0.3), 2.0)[0].any()  # identical scores: nobody
    w = soft_weights(scores, torch.ones(10), tau=0.1)
    assert float(w.sum()) == pytest.approx(1.0) and float(w[7:].sum()) < 0.02


# ---- alignment losses ------------------------------------------------------------------------------------
def simplex_prototypes(num_classes: int = 4, dim: int = 8) -> torch.Tensor:
    centred = torch.eye(num_classes, dim) - torch.eye(num_classes, dim).mean(0)
    return F.normalize(centred.double(), dim=1)


def test_prototype_contrastive_loss_is_minimal_when_features_equal_their_prototypes():
    protos = simplex_prototypes()
    labels = torch.tensor([0, 1, 2, 3, 1, 2])
    at_protos = prototype_contrastive_loss(protos[labels], labels, protos, temperature=0.1)
    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 0.1, 1.0):
        for _ in range(50):
            moved = protos[labels] + scale * torch.randn(6, 8, generator=g, dtype=torch.float64)
            assert prototype_contrastive_loss(moved, labels, protos, 0.1) > at_protos
    # the feature scale does not matter (features are normalised) and a wrong prototype costs a lot
    assert torch.allclose(prototype_contrastive_loss(5 * protos[labels], labels, protos, 0.1), at_protos)
    wrong = prototype_contrastive_loss(protos[(labels + 1) % 4], labels, protos, 0.1)
    assert wrong > at_protos + 5


def test_distillation_loss_is_zero_at_the_teacher_and_scales_with_t_squared():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    assert float(distillation_loss(teacher, teacher, 3.0)) == pytest.approx(0.0, abs=1e-6)
    kl = F.kl_div(F.log_softmax(student / 2, -1), F.softmax(teacher / 2, -1), reduction="batchmean")
    assert float(distillation_loss(student, teacher, 2.0)) == pytest.approx(4 * float(kl), rel=1e-5)


def test_both_parts_off_is_the_example_weighted_mean():
    strategy = ClipFedStrategy(pre_aggregation=False, post_aggregation=False)
    updates = [ClientUpdate(node_id=i, state={"w": torch.full((2,), float(i))}, num_examples=n, metrics={})
               for i, n in ((1, 10), (2, 30))]
    outcome = strategy.aggregate_updates(1, {"w": torch.zeros(2)}, updates)
    assert torch.allclose(outcome.state["w"], torch.full((2,), 1.75)) and outcome.rejected == {}


# ---- the teacher ------------------------------------------------------------------------------------------
def test_open_clip_teacher_missing_checkpoint_is_one_clear_error(tmp_path):
    missing = tmp_path / "clip" / "ViT-B-32.pt"
    with pytest.raises(TeacherCheckpointMissing) as info:
        OpenClipTeacher("ViT-B-32", missing, CLASSES)
    message = str(info.value)
    assert str(missing) in message and "nothing is downloaded" in message and "ViT-B-32" in message
    assert "\n" not in message and "torch.save" in message  # one line that says how to get the file


def test_missing_checkpoint_stops_the_run_before_flower_starts(tmp_path):
    from server.app import check_run
    from task.config import ConfigError, compose_config

    cfg = compose_config(["strategy=clipfed", "strategy.teacher.kind=open_clip",
                          f"strategy.teacher.checkpoint={tmp_path / 'nothing.pt'}"])
    with pytest.raises(ConfigError, match="strategy=clipfed: CLIP teacher checkpoint not found"):
        check_run(cfg)


@pytest.fixture(scope="module")
def tiny_clip_files(tmp_path_factory):
    import open_clip

    folder = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    torch.save(open_clip.CLIP(**TINY_CLIP).state_dict(), folder / "tiny.pt")
    (folder / "tiny.json").write_text(json.dumps(TINY_CLIP))
    return folder / "tiny.pt", folder / "tiny.json"


def test_tiny_open_clip_teacher_encodes_grayscale_cifar_sized_and_prompts(tiny_clip_files):
    checkpoint, config = tiny_clip_files
    teacher = OpenClipTeacher("tiny", checkpoint, CLASSES, model_config=config, logit_scale=100.0)
    x = torch.rand(5, 1, 28, 28)                      # Fashion-MNIST-sized: resized to 32, channels repeated
    emb = teacher.encode_images(x)
    assert emb.shape == (5, 16) and torch.allclose(emb.norm(dim=1), torch.ones(5), atol=1e-5)
    protos = teacher.class_prototypes()
    assert protos.shape == (10, 16) and teacher.embed_dim == 16
    assert torch.allclose(teacher.zero_shot_logits(x), 100.0 * emb @ protos.T, atol=1e-4)
    assert teacher.preprocess(x).shape == (5, 3, 32, 32)
    # the weights came from the file: a second teacher from it gives the same embeddings
    assert torch.allclose(OpenClipTeacher("tiny", checkpoint, CLASSES, model_config=config).encode_images(x), emb)


def test_image_folder_reads_class_sub_folders(tmp_path):
    from PIL import Image

    for folder, value in (("0", 10), ("Trouser", 200), ("ankle boot", 90)):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.full((40, 50, 3), value, dtype=np.uint8)).save(tmp_path / folder / "a.png")
    x, y = load_image_folder(tmp_path, [c.replace("/", "_") for c in CLASSES], 28, 28, 1)
    assert x.shape == (3, 28, 28, 1) and x.dtype == np.uint8
    assert sorted(y.tolist()) == [0, 1, 9]
    assert x[list(y).index(1)].mean() == pytest.approx(200, abs=1)


# ---- the whole defense through `flwr run` ------------------------------------------------------------------
@pytest.mark.slow
def test_clipfed_with_a_tiny_open_clip_teacher_runs_through_flower(tmp_path, tiny_clip_files):
    from tests.test_integration import read_rows, run, superlinks_of

    checkpoint, config = tiny_clip_files
    home, out = tmp_path / "flwr-home", tmp_path / "run"
    proc = run([sys.executable, "-m", "server.launch", "--out-dir", str(out), "experiment=smoke", "strategy=clipfed",
                "strategy.teacher.kind=open_clip", "strategy.teacher.model_name=tiny",
                f"strategy.teacher.checkpoint={checkpoint}", f"strategy.teacher.model_config={config}",
                "strategy.server_set.teacher_filter=false",   # a random teacher agrees with ~10% of labels
                "strategy.server_set.max_per_class=10", "strategy.kappa=0"], home, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "[clipfed] teacher: open_clip tiny (tiny.pt)" in log
    rows = read_rows(out)[1:]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        det = r["detection"]
        assert sum(det.values()) == 4 and det["tp"] + det["fn"] == 1
        # kappa = 0 rejects every score above the median: the cut acts and is recorded as detection
        assert det["tp"] + det["fp"] >= 1 and r["defense"]["n_rejected"] == det["tp"] + det["fp"]
        assert r["defense"]["kl_threshold"] >= r["defense"]["kl_median"] > 0
        assert r["defense"]["align_loss_last"] > 0
    assert superlinks_of(home) == []
