"""CLIP-Fed: vision-language-model-guided pre- and post-aggregation backdoor defense (server only).

Gai, Wang, Yu, Zhu, Wu, "A Vision-Language Pre-training Model-Guided Approach for Mitigating
Backdoor Attacks in Federated Learning", arXiv 2508.10315, https://arxiv.org/abs/2508.10315.

ONLY THE ABSTRACT (and the first paragraph of the introduction) IS PUBLIC; the code link could not be
retrieved. The abstract names the components: a server data set built with a multimodal model and
augmented with frequency analysis; a pre-aggregation defense; a post-aggregation alignment of the
global model with CLIP through a prototype contrastive loss and a KL divergence. Everything below the
component level is [INFERRED] (spec: /work/shared/specs/algorithms.md §3; the loss forms follow the
open CLIP2FL code, AAAI 2024, which CLIP-Fed resembles). Results from this module are NOT a
reproduction of CLIP-Fed's numbers.

Server set D_srv (built once, before round 1):
  O2  images from `server_set.image_folder` (one sub-folder per class, generated offline, see
      docs/results/clipfed.md) or, when none is configured, the server's clean split (a FALLBACK, not
      the paper's synthetic data); kept only where the teacher's zero-shot argmax equals the label.
  O3  `copies` variants per image and frequency augmentation (`task/frequency.py`: hf_noise, amp_mix,
      patch), same label.
  O4  the teacher's logits z_T on every image of D_srv, cached; its class prototypes t_c cached.
Per round, after the clients' replies (all on the server, no client half):
  P1  score_k = mean_x KL( softmax(z_T/T) ‖ softmax(f_θk(x)/T) ) over D_srv, or over its augmented
      part only (`score_on: augmented`).
  P2  `screening: mad`  -> reject score_k > median + κ·MAD (the rejected ids reach the records:
      detection TPR/FPR);  `screening: soft` -> weights w_k ∝ n_k · exp(-(score_k - min)/τ_s).
  P3  θ_g = example-weighted mean of the kept models (or the soft-weighted mean).
  Q1  E server epochs on D_srv of
        L = α_pcl · L_PCL + α_kl · T² · KL( softmax(z_T/T) ‖ softmax(z/T) ) (+ α_ce · CE(z, c))
      with L_PCL = -log softmax_c( ĥ·t_c / τ )[c], ĥ = normalize(proj(features)); proj is a linear
      head (kept across rounds) when the student's penultimate width differs from the teacher's.
  `pre_aggregation` and `post_aggregation` switch P1-P2 and Q1 separately (ablation).

Teachers (`task/teacher.py`): `open_clip` (weights from a local checkpoint file only) or `standin`
(NOT CLIP: the student's architecture trained on the server's clean split).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.common import log
from torch import nn

from strategies.aggregation import StateDict, weighted_average_states
from strategies.base import AggregationOutcome, AnomalyDetection, ClientUpdate, example_weights
from task.data import to_unit_float
from task.frequency import FREQUENCY_AUGMENTATIONS, frequency_augment
from task.teacher import (
    DEFAULT_PROMPT,
    FeatureTap,
    OpenClipTeacher,
    StandInTeacher,
    Teacher,
    TeacherCheckpointMissing,
    check_checkpoint,
)

# ---- defaults (the config keys, conf/strategy/clipfed.yaml) ---------------------------------------
TEACHER = {
    "kind": "standin",              # standin (NOT CLIP) | open_clip
    "model_name": "ViT-B-32",       # open_clip architecture (CLIP2FL uses ViT-B/32 [3P])
    "checkpoint": "~/.cache/thorn/clip/ViT-B-32.pt",  # local weights file; never downloaded at run time
    "model_config": None,           # an open_clip model-config JSON instead of the built-in one
    "prompt": DEFAULT_PROMPT,       # class prompt template
    "logit_scale": 100.0,           # zero-shot logits = scale · cos (CLIP2FL [3P]); null: the checkpoint's
    "class_names": None,            # null: the data set's class names
    "batch_size": 64,
    "standin_epochs": 5,            # epochs of the stand-in teacher's training on the clean split
}
SERVER_SET = {
    "image_folder": None,           # null: FALLBACK to the server's clean split (server.val_fraction)
    "max_per_class": 100,           # images per class taken from the source (null: all)
    "teacher_filter": True,         # keep an image only where the teacher's zero-shot argmax = its label
    "augmentations": list(FREQUENCY_AUGMENTATIONS),
    "copies": 1,                    # variants per image and augmentation
    "params": {},                   # per-augmentation keyword arguments, e.g. {patch: {size: 3}}
}
KD_TEMPERATURE = 3.0     # T: CLIP2FL's KD temperature [3P]
KAPPA = 2.0              # κ of the median + κ·MAD cut [INFERRED]
SOFT_TAU = 0.1           # τ_s of the soft weights, in KL units [INFERRED]
SERVER_EPOCHS = 1        # E: alignment epochs per round [INFERRED]
SERVER_LR = 0.01
SERVER_BATCH_SIZE = 64
ALPHA_PCL = 0.1          # CLIP2FL's contrast_alpha is 0.001 [3P]; larger here so the term acts in few rounds
ALPHA_KL = 1.0
ALPHA_CE = 0.0
PCL_TEMPERATURE = 0.1    # τ (CLIP2FL ins_temp [3P])

SCREENING_RULES = ("mad", "soft")
SCORE_ON = ("all", "augmented")
TEACHER_KINDS = ("standin", "open_clip")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")

_TAG = zlib.crc32(b"clipfed")


def _generator(*parts: int) -> torch.Generator:
    """A torch generator seeded from (parts..., the module tag): separate streams per use."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([*map(int, parts), _TAG]).generate_state(1)[0]))


# ---- the math (pure) --------------------------------------------------------------------------------
def kl_to_teacher(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per sample KL( softmax(z_T/T) ‖ softmax(z/T) ), shape (n,)."""
    log_q = F.log_softmax(teacher_logits.double() / temperature, dim=-1)
    log_p = F.log_softmax(student_logits.double() / temperature, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def kl_scores(teacher_logits: torch.Tensor, client_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """score_k = mean over samples of the KL to the teacher; `client_logits` (k, n, C) -> (k,)."""
    return torch.stack([kl_to_teacher(teacher_logits, z, temperature).mean() for z in client_logits])


def mad_cut(scores: torch.Tensor, kappa: float) -> tuple[torch.Tensor, float]:
    """(rejected mask, threshold): one-sided cut score > median + κ·MAD (raw MAD, lower median)."""
    s = scores.double()
    median = s.median()
    mad = (s - median).abs().median()
    threshold = float(median + kappa * mad)
    return s > threshold, threshold


def soft_weights(scores: torch.Tensor, num_examples: torch.Tensor, tau: float) -> torch.Tensor:
    """w_k ∝ n_k · exp(-(score_k - min score)/τ_s), normalised (shifting by the min avoids underflow)."""
    s = scores.double()
    w = num_examples.double() * torch.exp(-(s - s.min()) / tau)
    return w / w.sum()


def prototype_contrastive_loss(features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                               temperature: float) -> torch.Tensor:
    """L_PCL = mean_i -log softmax_c( ĥ_i·t_c / τ )[y_i] with ĥ = normalize(features), t = normalize(prototypes).

    When the prototypes are symmetric (a regular simplex, e.g. centred orthogonal directions) the loss
    is minimal exactly where every feature equals its class prototype; with correlated prototypes its
    minimiser also leans away from the other classes' prototypes (the contrastive part)."""
    h = F.normalize(features, dim=-1)
    t = F.normalize(prototypes.to(h.dtype), dim=-1)
    return F.cross_entropy(h @ t.T / temperature, labels)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL( softmax(z_T/T) ‖ softmax(z/T) ), averaged over the batch (CLIP2FL's KDLoss form [3P])."""
    log_p = F.log_softmax(student_logits / temperature, dim=-1)
    q = F.softmax(teacher_logits.to(log_p.dtype) / temperature, dim=-1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature ** 2


# ---- the server data set ----------------------------------------------------------------------------
@dataclasses.dataclass
class ServerSet:
    """D_srv in pixel space with the teacher's cached outputs."""

    x: torch.Tensor                  # float NCHW in [0, 1]
    y: torch.Tensor                  # int64 labels
    augmented: torch.Tensor          # bool: made by a frequency augmentation
    teacher_logits: torch.Tensor     # (n, C), cached once
    prototypes: torch.Tensor         # (C, d) unit-norm
    source: str
    stats: dict[str, float]


def _folder_label(name: str, class_names: list[str]) -> int | None:
    if name.isdigit():
        return int(name)
    lowered = [c.lower().replace("/", "_") for c in class_names]
    key = name.lower().replace("/", "_")
    return lowered.index(key) if key in lowered else None


def load_image_folder(folder: str | Path, class_names: list[str], height: int, width: int,
                      channels: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC images and labels from `folder/<class>/*.png|jpg|...`; a sub-folder is named by the
    class index (0, 1, ...) or the class name (case-insensitive, '/' written as '_')."""
    from PIL import Image

    root = Path(str(folder)).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"strategy.server_set.image_folder={str(root)!r} is not a folder")
    images, labels = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        label = _folder_label(sub.name, class_names)
        if label is None or not 0 <= label < len(class_names):
            raise ValueError(f"{sub}: a class folder must be named by a class index 0..{len(class_names) - 1} "
                             f"or a class name ({', '.join(class_names)})")
        for path in sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            with Image.open(path) as img:
                img = img.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
                array = np.asarray(img, dtype=np.uint8)
            images.append(array[..., None] if channels == 1 else array)
            labels.append(label)
    if not images:
        raise ValueError(f"strategy.server_set.image_folder={str(root)!r} holds no images in class sub-folders")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def cap_per_class(y: np.ndarray, max_per_class: int | None, generator: np.random.Generator) -> np.ndarray:
    """Sorted indices keeping at most `max_per_class` of each label (a seeded draw)."""
    if max_per_class is None:
        return np.arange(len(y))
    keep = [generator.permutation(np.flatnonzero(y == c))[:max_per_class] for c in np.unique(y)]
    return np.sort(np.concatenate(keep))


def build_server_set(x_uint8: np.ndarray, y: np.ndarray, teacher: Teacher, source: str, teacher_filter: bool,
                     augmentations: list[str], copies: int, params: Mapping[str, Mapping[str, Any]],
                     generator: torch.Generator) -> ServerSet:
    """O2-O4: teacher-agreement filter, frequency augmentations, cached teacher logits and prototypes."""
    x = to_unit_float(x_uint8)
    labels = torch.as_tensor(y, dtype=torch.long)
    logits = teacher.zero_shot_logits(x).cpu()
    agree = logits.argmax(1) == labels
    stats = {"source_images": float(len(labels)), "teacher_agreement": float(agree.double().mean())}
    if teacher_filter:
        if not bool(agree.any()):
            raise ValueError(f"the teacher ({teacher.label}) agrees with no label of the server set ({source}); "
                             "check class names and prompts, or set strategy.server_set.teacher_filter=false")
        x, labels, logits = x[agree], labels[agree], logits[agree]
    parts_x, parts_y, parts_aug = [x], [labels], [torch.zeros(len(labels), dtype=torch.bool)]
    for mode in augmentations:
        for _ in range(int(copies)):
            parts_x.append(frequency_augment(x, mode, generator, **dict(params.get(mode, {}) or {})))
            parts_y.append(labels)
            parts_aug.append(torch.ones(len(labels), dtype=torch.bool))
    x_all = torch.cat(parts_x)
    augmented = torch.cat(parts_aug)
    # the clean part's logits are already known; only the augmented images need the teacher again
    aug_logits = teacher.zero_shot_logits(x_all[augmented]).cpu() if bool(augmented.any()) else logits[:0]
    stats.update({"clean_images": float(len(labels)), "augmented_images": float(int(augmented.sum()))})
    return ServerSet(x=x_all, y=torch.cat(parts_y), augmented=augmented, teacher_logits=torch.cat([logits, aug_logits]),
                     prototypes=teacher.class_prototypes().detach().cpu().float(), source=source, stats=stats)


def _plain(value: Any) -> Any:
    """Hydra passes nested config groups as DictConfig/ListConfig: turn them into plain containers."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return value


# ---- the strategy -----------------------------------------------------------------------------------
class ClipFedStrategy(AnomalyDetection):
    """CLIP-Fed [INFERRED below the component level]: KL-to-teacher screening, then alignment to the teacher."""

    needs_server_data = True  # spec, model builder, device; the clean split is the FALLBACK server set

    def __init__(self, teacher: Mapping | None = None, server_set: Mapping | None = None,
                 dataset_name: str | None = None, dataset_root: str | None = None,
                 pre_aggregation: bool = True, screening: str = "mad", kappa: float = KAPPA,
                 soft_tau: float = SOFT_TAU, score_on: str = "all", kd_temperature: float = KD_TEMPERATURE,
                 post_aggregation: bool = True, server_epochs: int = SERVER_EPOCHS, server_lr: float = SERVER_LR,
                 server_batch_size: int = SERVER_BATCH_SIZE, alpha_pcl: float = ALPHA_PCL, alpha_kl: float = ALPHA_KL,
                 alpha_ce: float = ALPHA_CE, pcl_temperature: float = PCL_TEMPERATURE, seed: int = 0,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.teacher_cfg = {**TEACHER, **(_plain(teacher) or {})}
        self.server_set_cfg = {**SERVER_SET, **(_plain(server_set) or {})}
        self.dataset_name, self.dataset_root = dataset_name, dataset_root
        self.pre_aggregation, self.screening = bool(pre_aggregation), str(screening)
        self.kappa, self.soft_tau, self.score_on = float(kappa), float(soft_tau), str(score_on)
        self.kd_temperature = float(kd_temperature)
        self.post_aggregation, self.server_epochs = bool(post_aggregation), int(server_epochs)
        self.server_lr, self.server_batch_size = float(server_lr), int(server_batch_size)
        self.alpha_pcl, self.alpha_kl, self.alpha_ce = float(alpha_pcl), float(alpha_kl), float(alpha_ce)
        self.pcl_temperature, self.seed = float(pcl_temperature), int(seed)
        self.teacher: Teacher | None = None
        self.server_set: ServerSet | None = None
        self.projection: nn.Module | None = None
        self._projection_state: dict[str, torch.Tensor] | None = None  # restored before the head exists
        self._model: nn.Module | None = None
        self._tap: FeatureTap | None = None

    # ---- checks before round 1 (config only) ---------------------------------------------------------
    def check_preconditions(self, clients_per_round: int) -> None:
        t, s = self.teacher_cfg, self.server_set_cfg
        checks = [
            (t["kind"] in TEACHER_KINDS, "strategy.teacher.kind", t["kind"], ", ".join(TEACHER_KINDS)),
            (self.screening in SCREENING_RULES, "strategy.screening", self.screening, ", ".join(SCREENING_RULES)),
            (self.score_on in SCORE_ON, "strategy.score_on", self.score_on, ", ".join(SCORE_ON)),
            (self.kappa >= 0, "strategy.kappa", self.kappa, "a number >= 0"),
            (self.soft_tau > 0, "strategy.soft_tau", self.soft_tau, "a number > 0"),
            (self.kd_temperature > 0, "strategy.kd_temperature", self.kd_temperature, "a number > 0"),
            (self.pcl_temperature > 0, "strategy.pcl_temperature", self.pcl_temperature, "a number > 0"),
            (self.server_epochs >= 0, "strategy.server_epochs", self.server_epochs, "an integer >= 0"),
            (self.server_lr > 0, "strategy.server_lr", self.server_lr, "a number > 0"),
            (self.server_batch_size >= 2, "strategy.server_batch_size", self.server_batch_size, "an integer >= 2"),
            (int(s["copies"]) >= 0, "strategy.server_set.copies", s["copies"], "an integer >= 0"),
            (s["max_per_class"] is None or int(s["max_per_class"]) >= 1, "strategy.server_set.max_per_class",
             s["max_per_class"], "null or an integer >= 1"),
            (int(t["standin_epochs"]) >= 1, "strategy.teacher.standin_epochs", t["standin_epochs"], "an integer >= 1"),
        ]
        for ok, key, value, allowed in checks:
            if not ok:
                raise ValueError(f"{key}={value!r} is invalid; allowed: {allowed}")
        bad = [a for a in s["augmentations"] or [] if a not in FREQUENCY_AUGMENTATIONS]
        if bad:
            raise ValueError(f"strategy.server_set.augmentations has {bad}; "
                             f"allowed: {', '.join(FREQUENCY_AUGMENTATIONS)}")
        if self.score_on == "augmented" and not (s["augmentations"] and int(s["copies"]) > 0):
            raise ValueError("strategy.score_on=augmented needs strategy.server_set.augmentations and copies >= 1")
        if t["kind"] == "open_clip":
            try:
                check_checkpoint(t["checkpoint"], t["model_name"])
            except TeacherCheckpointMissing as exc:  # the caller turns ValueError into one config-error line
                raise ValueError(str(exc)) from exc
        if s["image_folder"] and not Path(str(s["image_folder"])).expanduser().is_dir():
            raise ValueError(f"strategy.server_set.image_folder={s['image_folder']!r} is not a folder")

    # ---- set-up (once, before round 1's replies) -----------------------------------------------------
    def class_names(self, num_classes: int) -> list[str]:
        names = self.teacher_cfg["class_names"]
        if names is None and self.dataset_name:
            from task.datasets import load_dataset

            # CIFAR-10-LT has CIFAR-10's classes; the cached base set avoids a second subsampling
            base = "cifar10" if self.dataset_name == "cifar10_lt" else self.dataset_name
            names = load_dataset(base, root=self.dataset_root).class_names
        if names is None:
            names = [str(c) for c in range(num_classes)]
            if self.teacher_cfg["kind"] == "open_clip":
                raise ValueError(f"dataset {self.dataset_name!r} has no class names: set strategy.teacher.class_names")
        if len(names) != num_classes:
            raise ValueError(f"strategy.teacher.class_names has {len(names)} names for {num_classes} classes")
        return list(names)

    def build_teacher(self, x_clean: np.ndarray, y_clean: np.ndarray, num_classes: int) -> Teacher:
        ctx, t = self.server_context, self.teacher_cfg
        if t["kind"] == "open_clip":
            return OpenClipTeacher(t["model_name"], t["checkpoint"], self.class_names(num_classes), t["prompt"],
                                   t["model_config"], t["logit_scale"], ctx.device, int(t["batch_size"]))
        return StandInTeacher.train_on(x_clean, y_clean, ctx.build_model, ctx.spec, ctx.local,
                                       int(t["standin_epochs"]), ctx.device, _generator(self.seed, 1), num_classes)

    def prepare(self) -> None:
        """Teacher, server set, cached teacher outputs, the student-shaped working model."""
        ctx = self.server_context
        if ctx is None:
            raise RuntimeError("CLIP-Fed needs a ServerContext (needs_server_data=True, server.val_fraction > 0)")
        s = self.server_set_cfg
        x_val, y_val = np.asarray(ctx.x_val), np.asarray(ctx.y_val)
        self._model = ctx.build_model().to(ctx.device)
        num_classes = int(last_linear_out(self._model))
        self._tap = FeatureTap(self._model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(_generator(self.seed, 0).initial_seed()))
            self.teacher = self.build_teacher(x_val, y_val, num_classes)
            if s["image_folder"]:
                _, h, w, c = x_val.shape
                x_src, y_src = load_image_folder(s["image_folder"], self.class_names(num_classes), h, w, c)
                source = f"image folder {s['image_folder']}"
            else:
                x_src, y_src = x_val, y_val
                source = "FALLBACK: the server's clean split (server.val_fraction), not generated images"
            keep = cap_per_class(y_src, s["max_per_class"], np.random.default_rng([self.seed, _TAG, 2]))
            generator = _generator(self.seed, 3)
            self.server_set = build_server_set(x_src[keep], y_src[keep], self.teacher, source,
                                               bool(s["teacher_filter"]), list(s["augmentations"] or []),
                                               int(s["copies"]), s["params"] or {}, generator)
            teacher_dim = int(self.server_set.prototypes.shape[1])
            self.projection = (nn.Identity() if teacher_dim == self._tap.dim
                               else nn.Linear(self._tap.dim, teacher_dim)).to(ctx.device)
        if self._projection_state is not None:
            self.projection.load_state_dict(self._projection_state)
        st = self.server_set.stats
        log(INFO, "[clipfed] teacher: %s", self.teacher.label)
        log(INFO, "[clipfed] server set: %s | %d source images, teacher agreement %.1f%% | %d kept + %d "
            "frequency-augmented (%s x%d)", self.server_set.source, int(st["source_images"]),
            100 * st["teacher_agreement"], int(st["clean_images"]), int(st["augmented_images"]),
            ",".join(s["augmentations"] or []) or "none", int(s["copies"]))

    def configure_train(self, server_round, arrays, config, grid):
        # the set-up runs before round 1's messages go out, so no round's aggregation time includes it
        if self.server_set is None and (self.pre_aggregation or self.post_aggregation):
            self.prepare()
        return super().configure_train(server_round, arrays, config, grid)

    # ---- P1-P2: screening ----------------------------------------------------------------------------
    @torch.no_grad()
    def logits_of(self, state: StateDict, x: torch.Tensor) -> torch.Tensor:
        """The logits of the model with `state` on pixel-space `x` (eval mode, batched)."""
        ctx = self.server_context
        self._model.load_state_dict(state)
        self._model.eval()
        out = [self._model(ctx.spec.to_model_input(x[i:i + 512].to(ctx.device))).float().cpu()
               for i in range(0, len(x), 512)]
        return torch.cat(out)

    def client_scores(self, updates: list[ClientUpdate]) -> torch.Tensor:
        ss = self.server_set
        mask = ss.augmented if self.score_on == "augmented" else torch.ones_like(ss.augmented)
        x, z_t = ss.x[mask], ss.teacher_logits[mask]
        return torch.stack([kl_to_teacher(z_t, self.logits_of(u.state, x), self.kd_temperature).mean()
                            for u in updates])

    def detect(self, server_round: int, global_state: StateDict, updates: list[ClientUpdate]) -> dict[int, str]:
        if not self.pre_aggregation or self.screening != "mad":
            return {}
        scores = self.client_scores(updates)
        rejected, threshold = mad_cut(scores, self.kappa)
        return {u.node_id: f"KL to the teacher {float(s):.4f} > median + kappa*MAD = {threshold:.4f}"
                for u, s, r in zip(updates, scores, rejected, strict=True) if bool(r)}

    # ---- Q1: alignment -------------------------------------------------------------------------------
    def align(self, state: StateDict, server_round: int) -> tuple[StateDict, dict[str, float]]:
        """E epochs of α_pcl·L_PCL + α_kl·T²·KL (+ α_ce·CE) on the server set, from `state`."""
        ctx, ss, model = self.server_context, self.server_set, self._model
        model.load_state_dict(state)
        model.train()
        self.projection.train()
        params = list(model.parameters()) + list(self.projection.parameters())
        optimizer = torch.optim.SGD(params, lr=self.server_lr, momentum=0.9)
        prototypes = ss.prototypes.to(ctx.device)
        generator = _generator(self.seed, 4, server_round)
        n, losses = len(ss.y), []
        for _ in range(self.server_epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, self.server_batch_size):
                idx = order[start:start + self.server_batch_size]
                if len(idx) < 2:  # a batch of one breaks BatchNorm
                    continue
                xb = ctx.spec.to_model_input(ss.x[idx].to(ctx.device))
                yb, z_t = ss.y[idx].to(ctx.device), ss.teacher_logits[idx].to(ctx.device)
                logits = model(xb)
                loss = self.alpha_kl * distillation_loss(logits, z_t, self.kd_temperature)
                if self.alpha_pcl > 0:
                    features = self.projection(self._tap.features)
                    loss = loss + self.alpha_pcl * prototype_contrastive_loss(features, yb, prototypes,
                                                                              self.pcl_temperature)
                if self.alpha_ce > 0:
                    loss = loss + self.alpha_ce * F.cross_entropy(logits, yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
        new_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        info = {"align_loss_first": losses[0], "align_loss_last": losses[-1]} if losses else {}
        return new_state, info

    # ---- aggregation -----------------------------------------------------------------------------------
    def aggregate_updates(self, server_round: int, global_state: StateDict,
                          updates: list[ClientUpdate]) -> AggregationOutcome:
        if self.server_set is None and (self.pre_aggregation or self.post_aggregation):
            self.prepare()  # when aggregate_updates is driven without configure_train (tests, benches)
        info: dict[str, float] = {}
        scores = None
        rejected: dict[int, str] = {}
        if self.pre_aggregation:
            scores = self.client_scores(updates)
            info.update({"kl_median": float(scores.median()), "kl_max": float(scores.max())})
        if self.pre_aggregation and self.screening == "mad":
            mask, threshold = mad_cut(scores, self.kappa)
            info["kl_threshold"] = threshold
            rejected = {u.node_id: f"KL to the teacher {float(s):.4f} > median + kappa*MAD = {threshold:.4f}"
                        for u, s, r in zip(updates, scores, mask, strict=True) if bool(r)}
            kept = [u for u in updates if u.node_id not in rejected]
            weights = example_weights(kept)
        elif self.pre_aggregation:  # soft weights: nobody is rejected
            kept = updates
            weights = soft_weights(scores, example_weights(updates), self.soft_tau)
        else:
            kept, weights = updates, example_weights(updates)
        if not kept:  # cannot happen with the MAD cut (the median never exceeds itself); kept for safety
            log(WARNING, "round %d: CLIP-Fed rejected every update: global model unchanged", server_round)
            return AggregationOutcome(state=None, weights={}, rejected=rejected, info=info)
        w = weights / weights.sum()
        state = weighted_average_states([u.state for u in kept], w)
        node_weights = {u.node_id: 0.0 for u in updates}
        node_weights.update({u.node_id: float(wi) for u, wi in zip(kept, w, strict=True)})
        if self.post_aggregation and self.server_epochs > 0:
            state, align_info = self.align(state, server_round)
            info.update(align_info)
        info["n_rejected"] = float(len(rejected))
        outcome = AggregationOutcome(state=state, weights=node_weights, rejected=rejected, info=info)
        if scores is not None and hasattr(outcome, "client_info"):  # per-client evidence, where the base has it
            outcome.client_info = {u.node_id: {"kl_to_teacher": float(s)} for u, s in zip(updates, scores,
                                                                                            strict=True)}
        return outcome

    # ---- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.projection is None:
            return {}
        return {"projection": {k: v.detach().cpu().clone() for k, v in self.projection.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._projection_state = state.get("projection")
        if self.projection is not None and self._projection_state is not None:
            self.projection.load_state_dict(self._projection_state)


def last_linear_out(model: nn.Module) -> int:
    """The number of classes: the width of the model's last linear layer."""
    from task.teacher import last_linear

    return last_linear(model).out_features
