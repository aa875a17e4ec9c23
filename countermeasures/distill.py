"""Distillation from the authorized network (UGE §3.2 Eq. 10; Table 1's "Distill" scheme)."""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.api import AUGMENTATIONS as KINDS
from bench.api import (COUNTERMEASURES, DATA, RECIPES, TRAIN, VICTIMS, Countermeasure, Fitted, ImageSet, Models,
                       Normalize, TrainHooks, make_recipe, train_and_evaluate)
from bench.victims.authorized import authorized_arch, authorized_start, authorized_stats

Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class Teacher(nn.Module):
    """The authorized network trained on the published set, with its input normalisation (a model artifact)."""

    def __init__(self, arch: str, classes: int, channels: int, size: int) -> None:
        super().__init__()
        self.arch = {"arch": arch, "classes": classes, "channels": channels, "size": size}
        self.net = nn.Sequential(Normalize(torch.zeros(channels), torch.ones(channels)),
                                 VICTIMS.create(arch).build(classes, channels, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@COUNTERMEASURES.register("distill")
class Distill(Countermeasure):
    """The hacker trains its network only by KL to the outputs of the authorized network (Eq. 10), which the
    protector does not keep secret (§3.2): min_θA KL(f_θ(x_u) ‖ f′_θA(x_u)) over the published images, no labels.

    The teacher f_θ is what an authorized user gets: the authorized network from its θ0 (the protection's
    ``authorized`` model where it fits one, else ``teacher_arch``/``init_seed``'s: ``victims.authorized``),
    trained normally on the same (protected) train set with ``teacher_recipe``. It is fitted once per
    protected set in the data stage and cached (``fits = ("teacher",)``); the data pass on unchanged. In the
    train stage the victim's cross-entropy is replaced by the KL to the frozen teacher on the same augmented
    batch. Applies to any protection (UGE Table 1's "Original Distill" row distils from the clean-trained one).

    Unstated in the paper, chosen here: the temperature (Eq. 10 has none: 1) and the teacher seeing the same
    augmented batch as the student. ``teacher_recipe`` should be the matrix's own recipe, so that the teacher is
    the network of the "Authorized" column; its ``dataset`` augmentation is taken as ``teacher_augment``.

    Attributes:
        teacher_arch: the authorized architecture (None: the protection's, else ResNet-18).
        init_seed: its θ0 seed (None: the protection's, else 0).
        index: which authorized network (Table 2's Distill-1, Distill-2: 0, 1).
        teacher_recipe: the recipe the teacher trains with.
        teacher_augment: its augmentation where that recipe says ``dataset``.
        temperature: softmax temperature τ of the KL (the loss is scaled by τ²).
    """

    paper: ClassVar[str] = "UGE §3.2 Eq. 10, Table 1 and 2 (Distill)"
    keeps_images: ClassVar[bool] = True  # the data stage fits the teacher only
    hooks_draw: ClassVar[bool] = False  # the KL to a frozen teacher draws nothing
    test_params: ClassVar[dict[str, object]] = {"teacher_recipe": "quick", "teacher_arch": "cnn"}
    stages: ClassVar[frozenset[str]] = frozenset({DATA, TRAIN})
    fits: ClassVar[tuple[str, ...]] = ("teacher",)
    uses_models: ClassVar[tuple[str, ...]] = ("authorized",)
    needs_labels: ClassVar[bool] = True  # the teacher learnt from them; the student never sees them
    expensive_on_cpu: ClassVar[bool] = True
    version: ClassVar[int] = 2  # 2: the teacher normalises as the protection fitted θ0 (UGE: clean statistics)
    teacher_arch: str | None = None
    init_seed: int | None = None
    index: int = 0
    teacher_recipe: str = "uge"
    teacher_augment: str = "crop_flip"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.teacher_recipe not in RECIPES:
            raise ValueError(f"distill teacher_recipe {self.teacher_recipe!r} is not a recipe ({', '.join(RECIPES)})")
        if self.teacher_augment not in KINDS:
            raise ValueError(f"distill teacher_augment {self.teacher_augment!r} is not one of {KINDS}")
        if self.temperature <= 0 or self.index < 0:
            raise ValueError("distill needs temperature > 0 and index ≥ 0")

    @classmethod
    def build_model(cls, kind: str, arch: dict[str, Any]) -> Teacher:
        if kind != "teacher":
            raise ValueError(f"distill fits a teacher, not a {kind!r} model")
        return Teacher(arch["arch"], arch["classes"], arch["channels"], arch["size"])

    def fit(self, train: ImageSet, *, seed: int, device: torch.device, models: Models | None = None) -> Fitted:
        models = models or Models()
        start = authorized_start(models, self.teacher_arch, self.init_seed, self.index, train.num_classes,
                                 train.channels, train.size)
        arch = authorized_arch(models, self.teacher_arch)
        recipe = make_recipe(self.teacher_recipe).for_victim(arch)
        augment = self.teacher_augment if recipe.augment == "dataset" else recipe.augment
        result = train_and_evaluate(start, train, train, recipe, seed=seed, device=device, augment=augment,
                                    evaluate_every_epoch=False, stats=authorized_stats(models))
        teacher = self.build_model("teacher", {"arch": arch, "classes": train.num_classes, "channels": train.channels,
                                               "size": train.size})
        teacher.net.load_state_dict(result["model"].state_dict())
        teacher = teacher.to(device).eval().requires_grad_(False)
        info = {"teacher": arch, "teacher_from": "protection's authorized θ0" if "authorized" in models else
                f"θ0 of {arch}, init seed {(self.init_seed or 0) + self.index}", "teacher_train_accuracy": result["final"]}
        return Fitted(train.with_images(train.images, **info), Models({"teacher": teacher}))

    def train_hooks(self, num_classes: int, image_size: int, models: Models | None = None) -> TrainHooks:
        if models is None or "teacher" not in models:
            raise RuntimeError("distill's train stage needs the teacher its data stage fitted")
        return TrainHooks(loss=self._loss(models["teacher"]))

    def _loss(self, teacher: nn.Module) -> Loss:
        tau = self.temperature

        def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                target = F.softmax(teacher(x).float() / tau, dim=1)
            logits = model(x)
            kl = F.kl_div(F.log_softmax(logits.float() / tau, dim=1), target, reduction="batchmean")
            return kl * tau ** 2, logits
        return loss
