"""DINOv2 loss terms as pure functions (``dinov2/loss/*.py`` semantics).

Kept stateless so each term can be checked on hand-computed cases; the only state (the EMA
center of softmax centering) is passed in and returned explicitly.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float,
                   n_iterations: int = 3) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp: each row (sample) sums to 1 and, across the global
    batch, every prototype receives ≈ the same mass (B/K), which prevents collapse without a
    center. Computed in fp32; sums are all-reduced so the balance is over all ranks. The
    number of samples B is all-reduced too, so ranks may hold different row counts (iBOT)."""
    q = torch.exp(teacher_logits.float() / teacher_temp).t()  # (K, B_local)
    n_samples = _all_reduce_sum(q.new_full((), float(q.shape[1])))  # a fill, not a host copy
    n_prototypes = q.shape[0]
    q /= _all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        q /= _all_reduce_sum(q.sum(dim=1, keepdim=True))  # equal mass per prototype
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)  # each sample is a distribution
        q /= n_samples
    q *= n_samples
    return q.t()


def dino_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                       student_temp: float) -> torch.Tensor:
    """Mean over rows of −Σ_k t_k · log_softmax(s/τ_s)_k."""
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs * log_p).sum(dim=-1).mean()


def dino_multicrop_loss(global_logits: torch.Tensor, local_logits: torch.Tensor | None,
                        teacher_probs: torch.Tensor, student_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed DINO cross-entropies of a multi-crop step: (global, local) sums over pairs.

    ``global_logits`` (2B, K) are paired row-wise with ``teacher_probs`` (2B, K, already
    view-swapped so no crop learns from itself); each of the n local chunks (B, K) of
    ``local_logits`` learns from both teacher views. Each pair contributes its mean over the B
    images, exactly the sum of ``dino_cross_entropy`` over pairs, in one contraction.
    """
    n_images = teacher_probs.shape[0] // 2
    log_p = F.log_softmax(global_logits.float() / student_temp, dim=-1)
    global_sum = -(teacher_probs * log_p).sum() / n_images
    if local_logits is None or local_logits.numel() == 0:
        return global_sum, global_sum.new_zeros(())
    log_q = F.log_softmax(local_logits.float() / student_temp, dim=-1)
    views = teacher_probs.view(2, n_images, -1).sum(dim=0)  # both teacher views, per image
    local_sum = -torch.einsum("lbk,bk->", log_q.view(-1, n_images, log_q.shape[-1]), views) / n_images
    return global_sum, local_sum


def koleo_loss(x: torch.Tensor) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimator: −mean log(distance to nearest neighbour) of the
    L2-normalised rows; it spreads features uniformly on the sphere. Self-pairs are excluded
    by setting the diagonal of the similarity matrix to −1 (below any cosine). In fp32 even
    under the loop's bf16 autocast (as DINOv2): bf16 cosines would tie near neighbours."""
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=1e-8)
        with torch.no_grad():
            sims = x @ x.t()
            sims.fill_diagonal_(-1.0)
            nearest = sims.argmax(dim=1)
        distances = nn.functional.pairwise_distance(x, x[nearest], p=2, eps=1e-8)
        return -torch.log(distances + 1e-8).mean()


def koleo_per_gpu(x: torch.Tensor, images_per_gpu: int | None) -> torch.Tensor:
    """``koleo_loss`` as DINOv2 takes it: each GPU searches nearest neighbours among its own
    images only, and DDP averages the GPUs' gradients. The rows split into ``n // images_per_gpu``
    groups (at least one, none smaller than ``images_per_gpu``), and the loss is the groups'
    mean; None: one group. With a batch that is a multiple of ``images_per_gpu`` the loss does
    not depend on how many ranks share it."""
    groups = 1 if images_per_gpu is None else max(1, x.shape[0] // images_per_gpu)
    return torch.stack([koleo_loss(g) for g in x.tensor_split(groups)]).mean()


def ibot_patch_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                    token_weights: torch.Tensor, n_images: int, student_temp: float) -> torch.Tensor:
    """iBOT loss over masked tokens only (rows = masked tokens of all images).

    ``token_weights`` = 1/#masked in the token's image, so every masked image counts
    equally whatever its mask ratio; dividing by all ``n_images`` (unmasked ones included)
    matches DINOv2's ``forward_masked``.
    """
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    per_token = (teacher_probs * log_p).sum(dim=-1)
    return (0.0 - (per_token * token_weights).sum()) / n_images  # 0.0 - x: no "-0.0" in logs


@torch.no_grad()
def softmax_center(teacher_logits: torch.Tensor, center: torch.Tensor,
                   teacher_temp: float) -> torch.Tensor:
    """DINO's original targets: softmax((t − center)/τ_t)."""
    return F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)


@torch.no_grad()
def updated_center(center: torch.Tensor, teacher_logits: torch.Tensor,
                   momentum: float = 0.9) -> torch.Tensor:
    """EMA of the teacher logits' batch mean over all ranks (the softmax-centering state)."""
    total = _all_reduce_sum(teacher_logits.float().sum(dim=0, keepdim=True))
    count = _all_reduce_sum(total.new_full((), float(teacher_logits.shape[0])))
    updated = center * momentum + (total / count.clamp_min(1)) * (1 - momentum)
    # nothing was masked anywhere: keep the center as it is (a select, not a host sync)
    return torch.where(count > 0, updated, center)
