"""Teachers for CLIP-Fed's server-side screening and alignment: a small interface and two kinds.

- `OpenClipTeacher`: a vision-language model through `open_clip` (open-clip-torch), built from a
  model name (or a model-config JSON) and weights read from a LOCAL checkpoint file. Nothing is
  downloaded at run time: a missing file raises `TeacherCheckpointMissing`, one message that says
  which file to fetch and where to put it. Pixel-space images (CIFAR-sized) are resized to the
  teacher's input size and normalised with the teacher's statistics; the student keeps its own
  preprocessing.
- `StandInTeacher`: NOT CLIP. A clean model of the student's architecture trained on the server's
  clean split; its penultimate features stand in for image embeddings and the class means of those
  features for the text prototypes. It exists to show the mechanism where no CLIP weights exist
  (offline, Fashion-MNIST); everything that reports it says "not CLIP".

Interface (all on pixel-space float NCHW images in [0, 1]):
`encode_images(x)` -> unit-norm embeddings (n, d); `class_prototypes()` -> unit-norm (C, d) (the
encoded class prompts for CLIP); `zero_shot_logits(x)` -> (n, C).
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from task.data import InputSpec, to_unit_float

DEFAULT_PROMPT = "a photo of a {}."   # CLIP2FL's template [3P]; CLIP-Fed's is not public
CHECKPOINT_HELP = (
    "On a machine with internet access, save the weights once with open_clip, e.g. "
    "python -c \"import open_clip, torch; m = open_clip.create_model('{model}', pretrained='laion2b_s34b_b79k'); "
    "torch.save(m.state_dict(), '{path}')\" (any pretrained tag of open_clip.list_pretrained() for {model}, or "
    "its downloaded open_clip_pytorch_model.bin / .safetensors, works too; OpenAI's weights need the "
    "-quickgelu model name), then copy the file to {path} on this machine, or point strategy.teacher.checkpoint "
    "at it."
)


class TeacherCheckpointMissing(FileNotFoundError):
    """The teacher's weights are not on disk; the message says which file to fetch and where to put it."""


def check_checkpoint(path: str | Path | None, model_name: str) -> Path:
    """The checkpoint as an existing file, or TeacherCheckpointMissing with the fix."""
    if path is None or str(path) == "":
        raise TeacherCheckpointMissing(
            f"strategy.teacher.checkpoint is not set: the open_clip teacher {model_name!r} needs a local weights "
            "file. " + CHECKPOINT_HELP.format(model=model_name, path="<a local path>"))
    resolved = Path(str(path)).expanduser()
    if not resolved.is_file():
        raise TeacherCheckpointMissing(
            f"CLIP teacher checkpoint not found: {resolved} (strategy.teacher.checkpoint, model {model_name!r}); "
            "nothing is downloaded at run time. " + CHECKPOINT_HELP.format(model=model_name, path=resolved))
    return resolved


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last `nn.Linear` in registration order (thorn's classifiers end in one)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to take features from")
    return linears[-1]


class FeatureTap:
    """Captures the input of a model's last `nn.Linear` (its penultimate features) on every forward.

    thorn's classifiers all end in one linear layer, so this works for each of them without changing
    the model classes."""

    def __init__(self, model: nn.Module) -> None:
        self.head = last_linear(model)
        self.features: torch.Tensor | None = None
        self._handle = self.head.register_forward_pre_hook(self._capture)

    @property
    def dim(self) -> int:
        return int(self.head.in_features)

    def _capture(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.features = torch.flatten(inputs[0], 1)

    def remove(self) -> None:
        self._handle.remove()


class Teacher(ABC):
    """What CLIP-Fed asks of its teacher."""

    label: str = ""          # how records and logs name it
    is_clip: bool = False
    num_classes: int = 0

    @property
    @abstractmethod
    def embed_dim(self) -> int: ...

    @abstractmethod
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel-space float NCHW in [0, 1] -> unit-norm embeddings (n, embed_dim)."""

    @abstractmethod
    def class_prototypes(self) -> torch.Tensor:
        """Unit-norm class prototypes (num_classes, embed_dim)."""

    @abstractmethod
    def zero_shot_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel-space float NCHW in [0, 1] -> class logits (n, num_classes)."""


def _batched(fn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else fn(x)


class OpenClipTeacher(Teacher):
    """An open_clip model with weights from a local file; zero-shot logits = scale · cos(image, prompt)."""

    is_clip = True

    def __init__(self, model_name: str, checkpoint: str | Path | None, class_names: list[str] | tuple[str, ...],
                 prompt: str = DEFAULT_PROMPT, model_config: str | Path | dict | None = None,
                 logit_scale: float | None = 100.0, device: torch.device | str = "cpu", batch_size: int = 64) -> None:
        path = check_checkpoint(checkpoint, model_name)
        import open_clip  # imported here: only this teacher needs it

        cfg = self.model_config(model_name, model_config)
        for tower, key in (("vision_cfg", "timm_model_name"), ("text_cfg", "hf_model_name")):
            if cfg.get(tower, {}).get(key):
                raise ValueError(f"open_clip model {model_name!r} uses a {key} tower, which would fetch files at "
                                 "run time; use a model with open_clip's own towers (ViT-*, RN*)")
        cfg.pop("custom_text", None)
        self.model = open_clip.CLIP(**cfg).eval().to(device)
        open_clip.load_checkpoint(self.model, str(path))
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.prompts = [prompt.format(name) for name in self.class_names]
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=int(cfg["text_cfg"].get(
            "context_length", 77)))
        size = self.model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, list | tuple) else (int(size), int(size))
        self.mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=self.device)[None, :, None, None]
        self.std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=self.device)[None, :, None, None]
        # CLIP2FL scores zero-shot logits as 100 · cosine [3P]; None uses the checkpoint's learned scale
        self.scale = float(self.model.logit_scale.exp()) if logit_scale is None else float(logit_scale)
        self.label = f"open_clip {model_name} ({path.name})"
        self._prototypes: torch.Tensor | None = None

    @staticmethod
    def model_config(model_name: str, model_config: str | Path | dict | None) -> dict:
        """The architecture: a dict, a JSON file (open_clip's format), or open_clip's built-in config."""
        import open_clip

        if isinstance(model_config, dict):
            return json.loads(json.dumps(model_config))  # a deep, plain copy
        if model_config:
            cfg = json.loads(Path(str(model_config)).expanduser().read_text())
            return cfg.get("model_cfg", cfg)
        cfg = open_clip.get_model_config(model_name)
        if cfg is None:
            raise ValueError(f"strategy.teacher.model_name={model_name!r} is not an open_clip model config; "
                             "allowed: a name from open_clip.list_models() or a model_config JSON file")
        return cfg

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel space [0,1] NCHW (any size, 1 or 3 channels) -> the teacher's input."""
        x = x.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False).clamp(0.0, 1.0)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        return _batched(lambda b: F.normalize(self.model.encode_image(self.preprocess(b)).float(), dim=-1),
                        x, self.batch_size)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def class_prototypes(self) -> torch.Tensor:
        if self._prototypes is None:
            self._prototypes = self.encode_prompts(self.prompts)
        return self._prototypes

    def zero_shot_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.encode_images(x) @ self.class_prototypes().T


class StandInTeacher(Teacher):
    """NOT CLIP: a clean classifier as teacher (penultimate features, class-mean prototypes, its logits)."""

    is_clip = False

    def __init__(self, model: nn.Module, spec: InputSpec, prototypes: torch.Tensor, description: str,
                 device: torch.device | str = "cpu", batch_size: int = 256) -> None:
        self.model = model.eval().to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tap = FeatureTap(self.model)
        self.spec, self.device, self.batch_size = spec, torch.device(device), int(batch_size)
        self._prototypes = F.normalize(prototypes.float().to(self.device), dim=-1)
        self.num_classes = int(prototypes.shape[0])
        self.label = f"stand-in teacher (NOT CLIP): {description}"

    @classmethod
    def train_on(cls, x: np.ndarray, y: np.ndarray, build_model, spec: InputSpec, local, epochs: int,
                 device: torch.device | str, generator: torch.Generator, num_classes: int) -> StandInTeacher:
        """Train `build_model()` on the clean uint8 NHWC (x, y) with the clients' local setup for `epochs`;
        the prototypes are the normalised class means of its penultimate features on (x, y)."""
        from task.train import evaluate_loss_accuracy, train_local

        model = build_model()
        train_local(model, x, y, spec, dataclasses.replace(local, epochs=int(epochs)), torch.device(device),
                    generator)
        _, accuracy = evaluate_loss_accuracy(model, x, y, spec, torch.device(device))
        teacher = cls(model, spec, torch.zeros(num_classes, last_linear(model).in_features), "", device)
        features = teacher.encode_images(to_unit_float(x))
        labels = torch.as_tensor(y, dtype=torch.long, device=features.device)
        sums = torch.zeros(num_classes, features.shape[1], device=features.device).index_add_(0, labels, features)
        teacher._prototypes = F.normalize(sums, dim=-1)
        teacher.label = (f"stand-in teacher (NOT CLIP): {type(model).__name__} trained {epochs} epochs on "
                         f"{len(y)} clean server images (train accuracy {100 * accuracy:.1f}%)")
        return teacher

    @property
    def embed_dim(self) -> int:
        return self.tap.dim

    @torch.no_grad()
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(self.spec.to_model_input(x.to(self.device, torch.float32)))
        return F.normalize(self.tap.features.float(), dim=-1), logits.float()

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        return _batched(lambda b: self._forward(b)[0], x, self.batch_size)

    def class_prototypes(self) -> torch.Tensor:
        return self._prototypes

    def zero_shot_logits(self, x: torch.Tensor) -> torch.Tensor:
        return _batched(lambda b: self._forward(b)[1], x, self.batch_size)
