"""Knowledge-transfer losses: pure, vectorised functions plus a registry by name.

Importing this package registers every loss in ``TRANSFER_LOSS_REGISTRY``:

====================  ===============================  ====================================
name                  function                         paper
====================  ===============================  ====================================
nst                   nst_loss(f_s, f_t, kernel=...)   Huang & Wang 2017 (NST)
kd                    kd_loss(logits_s, logits_t, T)   Hinton et al. 2015
fitnet                fitnet_loss(f_s, f_t, regressor) Romero et al. 2015
at                    at_loss(f_s, f_t, p=2)           Zagoruyko & Komodakis 2017
sp                    sp_loss(f_s, f_t)                Tung & Mori 2019
mmd                   mmd_loss(x_s, x_t, kernel=...)   KD^2M, Montesuma 2025
gaussian_w2           gaussian_w2_loss(x_s, x_t)       KD^2M
gaussian_kl           gaussian_kl_loss(x_s, x_t)       KD^2M
class_gaussian_w2     class_gaussian_w2_loss(..., labels)  KD^2M
class_gaussian_kl     class_gaussian_kl_loss(..., labels)  KD^2M
w2                    w2_loss(x_s, x_t)                KD^2M (exact OT via POT)
class_w2              class_w2_loss(..., labels)       KD^2M (exact OT via POT)
sinkhorn              sinkhorn_loss(x_s, x_t, reg)     KD^2M / Cuturi 2013 (via POT)
cwd                   cwd_loss(f_s, f_t, tau)          Shu et al. 2021 (CWD)
pkd                   pkd_loss(f_s, f_t)               Cao et al. 2022 (PKD)
mgd                   mgd_loss(f_s, f_t, module)       Yang et al. 2022 (MGD)
fgd                   fgd_loss(f_s, f_t, boxes, ...)   Yang et al. 2022 (FGD)
defeat                defeat_loss(f_s, f_t, boxes, ..) Guo et al. 2021 (DeFeat)
fgfi                  fgfi_loss(f_s, f_t, boxes, ...)  Wang et al. 2019 (FGFI)
reviewkd              reviewkd_loss(s_list, t_list, m) Chen et al. 2021 (ReviewKD)
dkd                   dkd_loss(logits_s, logits_t, y)  Zhao et al. 2022 (DKD)
====================  ===============================  ====================================

Internals: ``nst_loss`` and ``mmd2`` share one poly-2 MMD (``poly2.poly2_mmd2``, with the row
normalisation of NST folded in); the KD^2M losses share ``_utils.prepare_vectors``.

Conventions: student first, teacher second; the teacher is detached inside every loss; losses
return unweighted scalars computed in float32 (float64 inputs stay float64) even under autocast.
"""

from .attention import at_loss, attention_map
from .cwd import cwd_loss
from .defeat import DeFeatAdapter, defeat_loss
from .dkd import dkd_loss, dkd_parts
from .fgd import FGDGlobal, fgd_attention, fgd_loss
from .fgfi import FGFIAdapter, fgfi_loss
from .fitnet import FitNetRegressor, fitnet_loss
from .gaussian import (
    class_gaussian_kl_loss,
    class_gaussian_w2_loss,
    diag_gaussian_kl,
    diag_gaussian_w2,
    gaussian_kl_loss,
    gaussian_w2_loss,
)
from .gt_masks import assign_levels, defeat_fg_mask, fgd_masks, fgfi_mask, grid_anchors
from .kd import kd_loss
from .mgd import MGDGenerator, mgd_loss
from .mmd import gaussian_kernel, linear_kernel, mean_pairwise_sq_dist, mmd2, mmd_loss, poly_kernel
from .nst import nst_loss, nst_samples
from .pkd import pkd_loss, pkd_standardise
from .poly2 import cheaper_form, poly2_mmd2
from .registry import TRANSFER_LOSS_REGISTRY, build_transfer_loss, get_transfer_loss
from .reviewkd import ReviewKDFusion, hcl_loss, reviewkd_loss
from .similarity import sp_loss
from .transport import class_w2_loss, sinkhorn_loss, sq_dist_matrix, w2_loss

__all__ = [
    "TRANSFER_LOSS_REGISTRY",
    "build_transfer_loss",
    "get_transfer_loss",
    "nst_loss",
    "nst_samples",
    "mmd2",
    "mmd_loss",
    "poly2_mmd2",
    "cheaper_form",
    "linear_kernel",
    "poly_kernel",
    "gaussian_kernel",
    "mean_pairwise_sq_dist",
    "kd_loss",
    "fitnet_loss",
    "FitNetRegressor",
    "at_loss",
    "attention_map",
    "sp_loss",
    "diag_gaussian_w2",
    "diag_gaussian_kl",
    "gaussian_w2_loss",
    "gaussian_kl_loss",
    "class_gaussian_w2_loss",
    "class_gaussian_kl_loss",
    "sq_dist_matrix",
    "w2_loss",
    "class_w2_loss",
    "sinkhorn_loss",
    "cwd_loss",
    "pkd_loss",
    "pkd_standardise",
    "mgd_loss",
    "MGDGenerator",
    "fgd_loss",
    "fgd_attention",
    "FGDGlobal",
    "defeat_loss",
    "DeFeatAdapter",
    "fgfi_loss",
    "FGFIAdapter",
    "reviewkd_loss",
    "hcl_loss",
    "ReviewKDFusion",
    "dkd_loss",
    "dkd_parts",
    "fgd_masks",
    "assign_levels",
    "defeat_fg_mask",
    "fgfi_mask",
    "grid_anchors",
]
