"""Selection rules on embeddings: herding and k-center, the coreset baselines of the DC paper
(Zhao et al., ICLR 2021, Section 4.1) and the memories of continual learning (``sets/continual.py``).
Pure functions of an (N, D) embedding of one class."""
from __future__ import annotations

from typing import Optional

import torch


def herding_select(features: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy herding: indices of ``n`` rows whose running mean tracks the mean of all rows.

    Step ``k`` (1-based) picks, among the rows not yet chosen,
    ``argmin_i || mu - (s_{k-1} + phi_i) / k ||_2`` with ``mu`` the mean of every row and
    ``s_{k-1}`` the sum of the ``k - 1`` rows chosen so far (iCaRL Algorithm 4, Welling 2009).
    The first pick is therefore the row nearest the mean. Ties go to the lowest index.

    Args:
        features: (N, D) embeddings of one class.
        n: how many to pick, 0 <= n <= N.

    Returns:
        (n,) int64 row indices in the order picked (on ``features``' device).

    Raises:
        ValueError: ``features`` is not 2-D or ``n`` is outside [0, N].
    """
    if features.dim() != 2:
        raise ValueError(f"herding_select: features must be (N, D), got {tuple(features.shape)}")
    count = features.shape[0]
    if not 0 <= n <= count:
        raise ValueError(f"herding_select: cannot pick {n} of {count} rows")
    features = features.double()
    mean = features.mean(dim=0)
    running = torch.zeros_like(mean)
    available = torch.ones(count, dtype=torch.bool, device=features.device)
    picked = []
    for k in range(1, n + 1):
        distance = (mean - (running + features) / k).norm(dim=1)
        distance[~available] = float("inf")
        index = int(torch.argmin(distance))
        picked.append(index)
        available[index] = False
        running += features[index]
    return torch.tensor(picked, dtype=torch.long, device=features.device)


def kcenter_select(features: torch.Tensor, n: int, first: Optional[int] = None) -> torch.Tensor:
    """Greedy k-center (farthest-point) selection: indices of ``n`` rows.

    Starts from ``first`` (default: the row nearest the mean of all rows), then repeatedly adds
    ``argmax_i min_{c in centres} ||phi_i - phi_c||_2``, the row farthest from its nearest
    centre (Gonzalez 1985; Sener & Savarese 2018, Algorithm 1). Ties go to the lowest index.

    Args:
        features: (N, D) embeddings of one class.
        n: how many to pick, 0 <= n <= N.
        first: the first centre's index, or ``None``.

    Returns:
        (n,) int64 row indices in the order picked.

    Raises:
        ValueError: ``features`` is not 2-D, ``n`` outside [0, N] or ``first`` outside [0, N).
    """
    if features.dim() != 2:
        raise ValueError(f"kcenter_select: features must be (N, D), got {tuple(features.shape)}")
    count = features.shape[0]
    if not 0 <= n <= count:
        raise ValueError(f"kcenter_select: cannot pick {n} of {count} rows")
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    features = features.double()
    if first is None:
        first = int(torch.argmin((features - features.mean(dim=0)).norm(dim=1)))
    if not 0 <= first < count:
        raise ValueError(f"kcenter_select: first={first} outside [0, {count})")
    picked = [first]
    nearest = (features - features[first]).norm(dim=1)
    for _ in range(n - 1):
        index = int(torch.argmax(nearest))
        picked.append(index)
        nearest = torch.minimum(nearest, (features - features[index]).norm(dim=1))
    return torch.tensor(picked, dtype=torch.long, device=features.device)
