"""FID and KID of generated images' features against reference statistics, computed by torchmetrics.

torchmetrics' FrechetInceptionDistance and KernelInceptionDistance do the arithmetic (FID: ‖μ−μ_r‖² +
tr(Σ + Σ_r − 2(ΣΣ_r)^½) on float64 sums; KID: the unbiased polynomial-kernel MMD averaged over random subsets).
They are fed features, not images: the Inception network runs once per image for both (``_Features`` passes
its input through), and the reference side comes from a .npz instead of from images every time — its μ and
Σ are put into FID's real-image state, the way ``reset_real_features=False`` keeps them between evaluations.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.evaluation.reference_stats import ReferenceStats


class _Features(nn.Module):
    """The metrics' "feature extractor": the features are already computed."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_metric(stats: ReferenceStats):
    from torchmetrics.image.fid import FrechetInceptionDistance

    d = stats.mu.shape[0]
    # The features of every rank are gathered before they reach the metric (ldm.evaluation.evaluator), so the
    # metric's own synchronisation (which would also add up every rank's copy of the reference) stays off.
    fid = FrechetInceptionDistance(feature=_Features(d), reset_real_features=False, sync_on_compute=False)
    if stats.features is not None:
        fid.update(torch.as_tensor(stats.features), real=True)
    else:  # the sums FID's update would have accumulated over the n reference images
        n = stats.num_images
        mu = torch.as_tensor(stats.mu, dtype=torch.float64)
        sigma = torch.as_tensor(stats.sigma, dtype=torch.float64)
        fid.real_features_sum = mu * n
        fid.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
        fid.real_features_num_samples = torch.tensor(n)
    return fid


def kid_metric(stats: ReferenceStats, subsets: int, subset_size: int):
    from torchmetrics.image.kid import KernelInceptionDistance

    kid = KernelInceptionDistance(feature=_Features(stats.kid_features.shape[1]), subsets=subsets,
                                  subset_size=subset_size, reset_real_features=False, sync_on_compute=False)
    kid.update(torch.as_tensor(stats.kid_features), real=True)
    return kid


def fid_kid(features: torch.Tensor, stats: ReferenceStats, kid_subsets: int = 100, kid_subset_size: int = 1000,
            seed: int = 0) -> dict[str, float]:
    """FID, KID (mean and std over subsets) of ``features`` (N, d) against ``stats``. KID's subsets hold
    min(kid_subset_size, N, reference size) images and are drawn from a generator seeded with ``seed``, so the
    same features give the same number; the caller's random stream is left as it was."""
    features = features.detach().cpu().double()
    if features.shape[0] < 2:
        raise ValueError(f"FID and KID need at least 2 generated images, got {features.shape[0]}")
    fid = fid_metric(stats)
    fid.update(features, real=False)
    size = min(kid_subset_size, features.shape[0], stats.kid_features.shape[0])
    kid = kid_metric(stats, kid_subsets, size)
    kid.update(features.float(), real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global generator
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
            "kid_subset_size": float(size)}
