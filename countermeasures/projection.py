"""Orthogonal projection (Sandoval-Segura et al. 2023, 'What Can We Learn from Unlearnable Datasets?'):
remove from every training image the directions a linear model uses to classify the protected set."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from bench.api import COUNTERMEASURES, Countermeasure, ImageSet
from bench.countermeasures import _ops

CHUNK = 2 ** 24  # values per chunk of flattened images (float32) when fitting and projecting


@COUNTERMEASURES.register("orthogonal_projection")
class OrthogonalProjection(Countermeasure):
    """Data stage: fit a bias-free linear classifier W (K×D) on the flattened protected train set in [0, 1] by
    full-batch Adam on cross-entropy (``steps`` = 300, ``lr`` = 1e-3, from zero), centre its class weight
    vectors (subtract their mean, a direction the softmax ignores), orthonormalise the normalised rows (the
    authors' ``project_data(..., use_q_matrix=True)`` takes their QR) and project them out of every image:
    x − Q Qᵀ x, then clamp to [0, 1] and round to 8 bits. ``info`` reports the linear model's train accuracy.
    The centred rows span K − 1 dimensions, so Q is their SVD's right singular vectors up to that rank: a QR of
    all K would add a K-th column set by round-off, outside their span (version 1 removed it too: 0.47/255 a
    pixel on average, up to 13.8/255, on 500 CIFAR-10 images).

    After the projection all K logits W x are equal for every image, so a linearly separable (class-wise)
    shortcut is gone; the clamp and rounding leave a small residue. Deviations from the authors' code
    (``orthogonal_projection_step_1/2.py``): they train the linear model by mini-batch SGD (lr 0.1, batch 1024,
    20 epochs, lr × 0.1 at 50 % and 75 %) from PyTorch's random init; full-batch Adam from zero is used here
    (no sampling, hence no randomness, and a step that does not depend on the input scale), and the centring
    is added (SGD keeps the class-common direction near its small init, Adam does not). Their projected
    images stay float (outside [0, 1]) and train with strong augmentation (rotation, affine, colour jitter,
    crop, flip); here they are stored as 8-bit images and train with the recipe's augmentation.
    """

    paper: ClassVar[str] = "Sandoval-Segura et al. 2023 (orthogonal projection); DH §IV-A5 (OP)"
    needs_labels: ClassVar[bool] = True
    stages: ClassVar[frozenset[str]] = frozenset({"data"})
    version: ClassVar[int] = 2  # 2: the basis spans only the centred class directions (1: plus a round-off one)
    steps: int = 300
    lr: float = 1e-3

    def __post_init__(self) -> None:
        _ops.require(self.steps >= 1 and self.lr > 0, self, "steps ≥ 1 and lr > 0")

    def linear_model(self, train: ImageSet, device: torch.device) -> torch.Tensor:
        """The linear model's weights K×D (float32, on ``device``)."""
        flat = train.images.flatten(1)
        step = max(1, CHUNK // flat.shape[1])
        chunks = [(flat[i:i + step].to(device), train.labels[i:i + step].to(device))
                  for i in range(0, len(flat), step)]
        weight = torch.zeros(train.num_classes, flat.shape[1], device=device, requires_grad=True)
        optimizer = torch.optim.Adam([weight], lr=self.lr)
        for _ in range(self.steps):
            optimizer.zero_grad(set_to_none=True)
            for images, labels in chunks:  # gradient of the mean loss, accumulated chunk by chunk
                loss = F.cross_entropy(images.float().div(255) @ weight.T, labels, reduction="sum") / len(flat)
                loss.backward()
            optimizer.step()
        return weight.detach()

    @staticmethod
    def basis(weight: torch.Tensor) -> torch.Tensor:
        """An orthonormal basis D×r (float64) of the span of the centred, normalised class weights (r ≤ K − 1)."""
        centred = weight - weight.mean(0, keepdim=True)  # the softmax ignores a direction common to all classes
        rows = (centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)).double()
        _, singular, vh = torch.linalg.svd(rows, full_matrices=False)
        return vh[singular > singular.max() * 1e-9].T  # rank by a relative tolerance: centring removes one

    def purify(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        weight = self.linear_model(train, device)
        basis = self.basis(weight)
        flat = train.images.flatten(1)
        step = max(1, CHUNK // flat.shape[1])
        out = []
        for i in range(0, len(flat), step):
            x = flat[i:i + step].to(device).double().div(255)
            projected = x - (x @ basis) @ basis.T
            out.append(projected.clamp(0, 1).mul(255).round().to(torch.uint8).cpu())
        images = torch.cat(out).reshape(train.images.shape) if out else train.images.clone()
        with torch.no_grad():
            predicted = (flat.to(device).float().div(255) @ weight.T).argmax(1)
            accuracy = predicted.eq(train.labels.to(device)).float().mean()
        return train.with_images(images, linear_train_accuracy=round(accuracy.item(), 4))
