"""The evaluation's numbers, each a small function next to its definition.

Accuracies are shares in [0, 1]; "Total Acc" is the paper's mean top-1 accuracy over the erased
concepts (lower is better), preservation the same over every class that was not erased (higher is
better; its drop is measured against the unmodified model on the same prompts and seeds).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def top1_accuracy(predicted: Sequence[int] | torch.Tensor, label: int) -> float:
    """acc = (1/N) sum_i [argmax_k p_i(k) == label]  (`predicted` are the argmax labels)."""
    predicted = torch.as_tensor(predicted)
    return float((predicted == label).float().mean()) if len(predicted) else float("nan")


def mean(values: Sequence[float]) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


def total_accuracy(per_concept: dict[str, float]) -> float:
    """Total Acc = mean over erased concepts c of acc(c)."""
    return mean(list(per_concept.values()))


def preservation_drop(base: dict[str, float], model: dict[str, float]) -> dict[str, float]:
    """drop(k) = acc_base(k) - acc_model(k) for every kept class k (positive: damage)."""
    return {k: base[k] - model[k] for k in model}


def superclass_coherence(predicted: Sequence[int] | torch.Tensor, member_labels: Sequence[int]) -> float:
    """Share of a concept's pictures that the classifier puts in any member class of its superclass:
    coh(c) = (1/N) sum_i [argmax p_i in members(superclass(c))].  An erased tropical fish should still
    be some fish, not noise or a car."""
    predicted = torch.as_tensor(predicted)
    if not len(predicted):
        return float("nan")
    return float(torch.isin(predicted, torch.as_tensor(list(member_labels))).float().mean())


def revival(accuracy: list[list[float]], erased_at: list[int], threshold: float = 0.2) -> list[dict]:
    """Erasures that come back in a sequential run.

    accuracy[c][j]: accuracy of concept c after stage j (column 0 is the base model); erased_at[c]: the
    stage that erased c (0 if never). Concept c is revived at stage j > erased_at[c] when
    acc[c][j] - acc[c][erased_at[c]] > threshold.
    """
    found = []
    for c, row in enumerate(accuracy):
        s = erased_at[c]
        if s <= 0:
            continue
        for j in range(s + 1, len(row)):
            if row[j] - row[s] > threshold:
                found.append({"concept": c, "stage": j, "accuracy": row[j], "after_erasure": row[s]})
    return found


def clip_scores(scorer, groups: dict[str, list]) -> dict[str, float]:
    """CLIP score (and its emoji analogue) per prompt: the mean over a prompt's pictures of
    100 * cos(image_i, prompt), with `scorer.similarity(images, texts)` -> [B, T] giving 100 * cosine.
    One scorer call for every (prompt -> pictures) group: each prompt encoded once, each group's mean
    read from its own prompt's column."""
    prompts = [p for p, ims in groups.items() if len(ims)]
    if not prompts:
        return {p: float("nan") for p in groups}
    sim = scorer.similarity([im for p in prompts for im in groups[p]], prompts).float()
    out, start = {}, 0
    for j, p in enumerate(prompts):
        n = len(groups[p])
        out[p] = float(sim[start:start + n, j].mean())
        start += n
    return {p: out.get(p, float("nan")) for p in groups}


def _covariance(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    mu = x.mean(0)
    d = x - mu
    return mu, d.T @ d / max(len(x) - 1, 1)


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix through its eigen-decomposition."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between feature sets a [N, D] and b [M, D] (Gaussians fitted to each):

        d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)),

    with tr (S_a S_b)^(1/2) = tr (S_a^(1/2) S_b S_a^(1/2))^(1/2), a symmetric PSD matrix, so both
    square roots are eigen-decompositions (float64, tiny negative eigenvalues clamped to 0)."""
    mu_a, s_a = _covariance(a)
    mu_b, s_b = _covariance(b)
    root_a = _psd_sqrt(s_a)
    middle = root_a @ s_b @ root_a
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    d2 = (mu_a - mu_b).square().sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * tr_covmean
    return float(d2.clamp(min=0))


def kernel_distance(a: torch.Tensor, b: torch.Tensor, subsets: int = 10, subset_size: int = 100, seed: int = 0) -> float:
    """KID: unbiased MMD^2 with the cubic kernel k(x, y) = (x.y / D + 1)^3, averaged over random
    subsets of `subset_size` from each set (fewer if a set is smaller)."""
    a, b = a.double(), b.double()
    n = min(subset_size, len(a), len(b))
    if n < 2:
        return float("nan")
    g = torch.Generator().manual_seed(seed)
    dim = a.shape[1]
    total = 0.0
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=g)[:n]]
        y = b[torch.randperm(len(b), generator=g)[:n]]
        kxx, kyy, kxy = ((x @ x.T) / dim + 1) ** 3, ((y @ y.T) / dim + 1) ** 3, ((x @ y.T) / dim + 1) ** 3
        off = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
        total += float(off - 2 * kxy.mean())
    return total / subsets


def count_detections(detections: list[dict[str, float]], classes: Sequence[str], threshold: float) -> dict[str, int]:
    """Per class, the number of pictures with a detection of that class scoring >= threshold (a picture
    counts once per class however many boxes it has), plus "any": pictures with at least one."""
    counts = {c: 0 for c in classes}
    flagged = 0
    for scores in detections:
        hit = False
        for c in classes:
            if scores.get(c, 0.0) >= threshold:
                counts[c] += 1
                hit = True
        flagged += hit
    return {**counts, "any": flagged}
