"""Diagonal-Gaussian distribution metrics for feature distillation (Montesuma 2025, KD^2M).

A batch of feature vectors is summarised by its per-dimension mean and (population) standard
deviation; the metrics compare those Gaussians in closed form. Label-conditional versions fit
one Gaussian per class present in the batch (vectorised with index_add, no Python loop).
"""

import torch

from ._utils import full_precision, prepare_vectors
from .registry import TRANSFER_LOSS_REGISTRY

__all__ = [
    "diag_gaussian_w2",
    "diag_gaussian_kl",
    "gaussian_w2_loss",
    "gaussian_kl_loss",
    "class_gaussian_w2_loss",
    "class_gaussian_kl_loss",
]

# Added to variances before sqrt: keeps the std differentiable at 0 and the KL finite.
_VAR_EPS = 1e-8


def diag_gaussian_w2(
    mu1: torch.Tensor, std1: torch.Tensor, mu2: torch.Tensor, std2: torch.Tensor
) -> torch.Tensor:
    """Squared 2-Wasserstein distance between diagonal Gaussians N(mu1, std1^2), N(mu2, std2^2).

    W2^2 = ||mu1 - mu2||^2 + ||std1 - std2||^2 (Dowson & Landau 1982; KD^2M, Montesuma 2025).

    Args:
        mu1, std1, mu2, std2: [..., D].
    Returns:
        [...] W2^2.
    """
    return (mu1 - mu2).pow(2).sum(-1) + (std1 - std2).pow(2).sum(-1)


def diag_gaussian_kl(
    mu1: torch.Tensor, std1: torch.Tensor, mu2: torch.Tensor, std2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mu1, std1^2) || N(mu2, std2^2)) for diagonal Gaussians (KD^2M, Montesuma 2025).

    KL = sum_d [ log(std2/std1) + (std1^2 + (mu1 - mu2)^2) / (2 std2^2) - 1/2 ].

    Args:
        mu1, std1, mu2, std2: [..., D]; stds > 0.
    Returns:
        [...] KL divergence.
    """
    var2 = std2.pow(2)
    terms = torch.log(std2 / std1) + (std1.pow(2) + (mu1 - mu2).pow(2)) / (2 * var2) - 0.5
    return terms.sum(-1)


def _fit(x: torch.Tensor, eps: float):
    """Mean and population std (sqrt(var + eps)) over the batch: [b, D] -> [D], [D]."""
    mean = x.mean(0)
    return mean, (x - mean).pow(2).mean(0).add(eps).sqrt()


def _fit_per_class(x: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor, eps: float):
    """Per-class mean and population std: [b, D] -> [k, D], [k, D] (classes from ``inverse``)."""
    k, d = counts.shape[0], x.shape[1]
    n = counts.to(x.dtype).unsqueeze(1)
    mean = x.new_zeros(k, d).index_add(0, inverse, x) / n
    # Centred second pass: E[x^2] - E[x]^2 would cancel catastrophically in float32.
    var = x.new_zeros(k, d).index_add(0, inverse, (x - mean[inverse]).pow(2)) / n
    return mean, var.add(eps).sqrt()


@TRANSFER_LOSS_REGISTRY.register(name="gaussian_w2")
@full_precision
def gaussian_w2_loss(x_s: torch.Tensor, x_t: torch.Tensor, eps: float = _VAR_EPS) -> torch.Tensor:
    """W2^2 between diagonal Gaussians fitted to student and teacher feature batches (KD^2M).

    Montesuma 2025 (arXiv 2504.01757). std = sqrt(population variance + eps).

    Args:
        x_s: [b, D] student features ([b, C, *spatial] is average-pooled to [b, C]).
        x_t: [b', D] teacher features (detached).
        eps: variance floor.
    Returns:
        Scalar ||mu_s - mu_t||^2 + ||std_s - std_t||^2.
    """
    x_s, x_t = prepare_vectors(x_s, x_t, "gaussian_w2_loss")
    return diag_gaussian_w2(*_fit(x_s, eps), *_fit(x_t, eps))


@TRANSFER_LOSS_REGISTRY.register(name="gaussian_kl")
@full_precision
def gaussian_kl_loss(x_s: torch.Tensor, x_t: torch.Tensor, eps: float = _VAR_EPS) -> torch.Tensor:
    """KL(N_s || N_t) between diagonal Gaussians fitted to student / teacher features (KD^2M).

    Montesuma 2025 (arXiv 2504.01757); the direction (student first) follows the KD^2M
    reference code. Note it is the reverse of KD's KL(teacher || student).

    A teacher dimension that is constant over the batch (a dead channel) has variance `eps`
    only: its term is ~(student variance + mean gap^2) / (2 eps), which dominates the loss
    (the KL to a point mass is infinite); `gaussian_w2` stays bounded there. A batch of one
    image on either side has no variance at all: the loss is 0 then (as the class-conditional
    losses' `min_count=2`).

    Args:
        x_s: [b, D] student features ([b, C, *spatial] is average-pooled to [b, C]).
        x_t: [b', D] teacher features (detached).
        eps: variance floor (keeps a constant feature from giving an infinite KL).
    Returns:
        Scalar KL divergence.
    """
    x_s, x_t = prepare_vectors(x_s, x_t, "gaussian_kl_loss")
    if min(x_s.shape[0], x_t.shape[0]) < 2:  # every variance 0: KL ~ gap^2 / eps
        return x_s.sum() * 0  # keeps the graph (and DDP's used-parameter set) intact
    return diag_gaussian_kl(*_fit(x_s, eps), *_fit(x_t, eps))


def _class_metric(metric, x_s, x_t, labels, reduction, min_count, eps, name):
    """Apply a Gaussian metric per class and reduce over classes with >= min_count samples."""
    x_s, x_t = prepare_vectors(x_s, x_t, name)
    if labels.dim() != 1 or not (labels.shape[0] == x_s.shape[0] == x_t.shape[0]):
        raise ValueError(f"{name}: need paired x_s, x_t [b, D] and labels [b]")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean'; got {reduction!r}")
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    per_class = metric(
        *_fit_per_class(x_s, inverse, counts, eps), *_fit_per_class(x_t, inverse, counts, eps)
    )
    per_class = per_class[counts >= min_count]
    if per_class.numel() == 0:
        return x_s.sum() * 0  # keeps the graph (and DDP's used-parameter set) intact
    return per_class.sum() if reduction == "sum" else per_class.mean()


@TRANSFER_LOSS_REGISTRY.register(name="class_gaussian_w2")
@full_precision
def class_gaussian_w2_loss(
    x_s: torch.Tensor,
    x_t: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "sum",
    min_count: int = 1,
    eps: float = _VAR_EPS,
) -> torch.Tensor:
    """Label-conditional diagonal-Gaussian W2^2 (KD^2M, Montesuma 2025).

    One Gaussian per class present in the batch, for student and teacher (paired images, same
    labels); the per-class W2^2 are summed (as in the KD^2M code) or averaged.

    Args:
        x_s: [b, D] student features; x_t: [b, D] teacher features (detached).
        labels: [b] integer class labels.
        reduction: "sum" or "mean" over classes.
        min_count: classes with fewer samples are skipped.
        eps: variance floor.
    Returns:
        Scalar loss.
    """
    return _class_metric(
        diag_gaussian_w2, x_s, x_t, labels, reduction, min_count, eps, "class_gaussian_w2_loss"
    )


@TRANSFER_LOSS_REGISTRY.register(name="class_gaussian_kl")
@full_precision
def class_gaussian_kl_loss(
    x_s: torch.Tensor,
    x_t: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "sum",
    min_count: int = 2,
    eps: float = _VAR_EPS,
) -> torch.Tensor:
    """Label-conditional diagonal-Gaussian KL(N_s^c || N_t^c) (KD^2M, Montesuma 2025).

    As :func:`class_gaussian_w2_loss`; classes with a single sample are skipped by default
    because their fitted variance is only ``eps`` and the KL would be dominated by 1/eps.

    Args:
        x_s: [b, D] student features; x_t: [b, D] teacher features (detached).
        labels: [b] integer class labels.
        reduction: "sum" or "mean" over classes.
        min_count: classes with fewer samples are skipped.
        eps: variance floor.
    Returns:
        Scalar loss.
    """
    return _class_metric(
        diag_gaussian_kl, x_s, x_t, labels, reduction, min_count, eps, "class_gaussian_kl_loss"
    )


# distributions in the channels' space, no adapter: the core refuses pairs of other widths
for _loss in (gaussian_w2_loss, gaussian_kl_loss, class_gaussian_w2_loss, class_gaussian_kl_loss):
    _loss.same_channels = True
