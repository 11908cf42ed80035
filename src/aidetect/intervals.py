"""Bootstrap confidence intervals of accuracy, balanced accuracy, AUROC and AP (positive class = fake = 1).

Class-stratified: each of ``RESAMPLES`` resamples draws, with replacement, as many reals from the reals
and as many fakes from the fakes as the sample has, so every resample keeps the class counts (a metric's
spread is that of the images drawn, never of a changing class balance); with sources, within each (class,
source) group, as the splits are stratified, so each source keeps its counts too. The overall and the
per-source intervals come from the same resamples; a fake source's AUROC and AP are against every real
sample drawn, as ``metrics.per_source`` computes them. The draws come from one seeded
generator (``SEED``): the same scores give the same intervals. An interval is the 2.5th and 97.5th
percentile of the resampled values (``LEVEL``).

Vectorised: the resamples are one matrix of indices, turned into per-resample counts of each sample; every
metric is then a weighted count. AUROC is the Mann-Whitney statistic (ties count one half) and AP the mean,
over the resampled fakes, of the precision at their score, both read off per-resample cumulative counts
over the sorted scores, the definitions scikit-learn's ``roc_auc_score`` and ``average_precision_score``
compute. Resamples are processed ``CHUNK`` at a time to bound memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95
CHUNK = 100  # resamples per block: a block of 10,000 images holds a few float64 matrices of 8 MB


@dataclass
class Drawn:
    """One block of resamples: how often each sample is drawn in each resample (``weights``, samples x
    resamples: a subset of samples is a block of rows), and the reals' scores in increasing order with, per
    resample, the running count of drawn reals over them (``reals_below[k]``: drawn reals among the k lowest)."""

    weights: np.ndarray
    real_scores: np.ndarray
    reals_below: np.ndarray


def stratified_resamples(groups: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(resamples, n)`` indices into ``groups`` (a group id per sample, e.g. the label): each row draws, with
    replacement, from each group as many samples as it has, so every row keeps each group's count."""
    members = [np.flatnonzero(groups == group) for group in np.unique(groups)]
    return np.concatenate([group[rng.integers(0, len(group), size=(resamples, len(group)))] for group in members], 1)


def counts_of(indices: np.ndarray, n: int) -> np.ndarray:
    """How often each of the ``n`` samples is drawn in each row (resample) of ``indices``: ``(n, rows)`` float64."""
    rows = indices.shape[0]
    flat = (indices * rows + np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=n * rows).reshape(n, rows).astype(np.float64)


def drawn(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> Drawn:
    """The block of resamples whose draws are ``weights`` (samples x resamples)."""
    real = np.flatnonzero(labels == 0)
    order = real[np.argsort(scores[real], kind="stable")]
    return Drawn(weights, scores[order], cumulative(weights[order]))


def cumulative(weights: np.ndarray) -> np.ndarray:
    """Running sums down the rows with a leading 0: ``[k]`` is the sum of the first k rows."""
    running = np.zeros((len(weights) + 1, weights.shape[1]))
    np.cumsum(weights, axis=0, out=running[1:])
    return running


def subset_metrics(
    block: Drawn, scores: np.ndarray, labels: np.ndarray, correct: np.ndarray, subset: np.ndarray
) -> dict[str, np.ndarray]:
    """Per resample of ``block``: accuracy over ``subset`` (a mask), its real and fake accuracy, balanced accuracy
    where it has both classes, and AUROC and AP of its fakes against every real drawn (all that are defined)."""
    fake, real = subset & (labels == 1), subset & (labels == 0)
    weights = block.weights  # masks as vectors, no copy of rows; einsum, not BLAS: no threads to contend for
    values = {"accuracy": np.einsum("i,ij->j", correct * subset, weights) / subset.sum()}
    if real.any():
        values["real_accuracy"] = np.einsum("i,ij->j", correct * real, weights) / real.sum()
    if fake.any():
        values["fake_accuracy"] = np.einsum("i,ij->j", correct * fake, weights) / fake.sum()
    if real.any() and fake.any():
        values["balanced_accuracy"] = (values["real_accuracy"] + values["fake_accuracy"]) / 2
    if fake.any() and len(block.real_scores):
        values |= ranked_metrics(block, scores[fake], weights[fake])
    return values


def ranked_metrics(block: Drawn, fakes: np.ndarray, fake_w: np.ndarray) -> dict[str, np.ndarray]:
    """AUROC and AP per resample of the fakes scored ``fakes`` (drawn ``fake_w`` times) against the drawn reals."""
    n_fake, n_real = len(fakes), len(block.real_scores)  # drawn per row too: stratified
    below = block.reals_below[np.searchsorted(block.real_scores, fakes, side="left")]  # reals scored lower
    not_above = block.reals_below[np.searchsorted(block.real_scores, fakes, side="right")]
    auroc = (fake_w * (below + not_above) / 2).sum(axis=0) / (n_fake * n_real)  # a tie counts one half
    order = np.argsort(fakes, kind="stable")
    fakes_below = cumulative(fake_w[order])[np.searchsorted(fakes[order], fakes, side="left")]
    true_positives = n_fake - fakes_below  # drawn fakes scored at least this fake's score
    precision = true_positives / np.maximum(true_positives + n_real - below, 1)
    return {"auroc": auroc, "ap": (fake_w * precision).sum(axis=0) / n_fake}


def bootstrap_intervals(
    scores: ArrayLike,
    labels: ArrayLike,
    threshold: float = 0.5,
    sources: ArrayLike | None = None,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> dict[str, dict[str, list[float]]]:
    """The ``LEVEL`` percentile intervals over stratified bootstrap resamples (decisions at ``threshold``):
    ``{"overall": {key: [low, high]}}`` and, with ``sources`` (one per sample), ``{"per_source": {source:
    {key: [low, high]}}}``, for each key of accuracy, real_accuracy, fake_accuracy, balanced_accuracy, auroc
    and ap that the samples define (``subset_metrics``); ``{}`` without samples."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if not len(labels):
        return {}
    names = np.asarray(sources) if sources is not None else np.zeros(len(labels), dtype=np.int64)
    subsets = {name: names == name for name in np.unique(names)} if sources is not None else {}
    groups = np.unique(np.stack([labels.astype(str), names.astype(str)]), axis=1, return_inverse=True)[1]
    correct = ((scores >= threshold) == (labels == 1)).astype(np.float64)
    everything = np.ones(len(labels), dtype=bool)
    rng, blocks = np.random.default_rng(seed), []
    for start in range(0, resamples, CHUNK):
        indices = stratified_resamples(groups.ravel(), min(CHUNK, resamples - start), rng)
        block = drawn(scores, labels, counts_of(indices, len(labels)))
        blocks.append(
            {name: subset_metrics(block, scores, labels, correct, subset) for name, subset in subsets.items()}
            | {None: subset_metrics(block, scores, labels, correct, everything)}
        )
    intervals = {str(name): percentiles([block[name] for block in blocks]) for name in subsets}
    return {"overall": percentiles([block[None] for block in blocks])} | ({"per_source": intervals} if subsets else {})


def percentiles(blocks: list[dict[str, np.ndarray]]) -> dict[str, list[float]]:
    """Each key's ``LEVEL`` percentile interval over the resampled values of every block."""
    tail = (1 - LEVEL) / 2 * 100
    return {
        key: np.percentile(np.concatenate([b[key] for b in blocks]), [tail, 100 - tail]).tolist() for key in blocks[0]
    }
