"""Calibration of the probability of fake: ECE, NLL and Brier score, and temperature scaling.

A detector's score is ``sigmoid(logit)``; temperature scaling replaces it by ``sigmoid(logit / T)`` with one
T > 0 fitted on the validation fold by minimising the negative log-likelihood (a bounded 1-D search on
log T: the NLL is smooth and has one minimum in T). The sign of a logit does not change, so neither does a
decision at 0.5, nor the order of scores (AUROC, AP): only how far the probabilities are to be believed.

ECE here is that of the probability of fake (the positive class): ``ECE_BINS`` equal-width bins on that
probability, each bin's |mean probability - fraction of fakes| weighted by its share of the samples.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar
from scipy.special import expit

from aidetect.errors import UserError

ECE_BINS = 15
# log T is searched in [-LOG_T_BOUND, LOG_T_BOUND]: T from 1/20 to 20, far beyond what a trained model needs.
LOG_T_BOUND = float(np.log(20.0))
# Probabilities are clipped this far from 0 and 1 before a logarithm: float32's resolution next to 1.
EPSILON = float(np.finfo(np.float32).eps / 2)


def apply_temperature(logits: ArrayLike, temperature: float | None) -> np.ndarray:
    """Probabilities of fake, ``sigmoid(logits / temperature)`` (float64); ``None`` is no scaling (T = 1)."""
    return expit(np.asarray(logits, dtype=np.float64) / (temperature or 1.0))


def logits_of(probabilities: ArrayLike) -> np.ndarray:
    """The logits whose sigmoid are ``probabilities`` (clipped by ``EPSILON`` from 0 and 1): for scores that
    come without their logits."""
    clipped = np.clip(np.asarray(probabilities, dtype=np.float64), EPSILON, 1 - EPSILON)
    return np.log(clipped) - np.log1p(-clipped)


def nll(probabilities: ArrayLike, labels: ArrayLike) -> float:
    """Mean negative log-likelihood of the labels (1 = fake) under ``probabilities`` of fake."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), EPSILON, 1 - EPSILON)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def brier(probabilities: ArrayLike, labels: ArrayLike) -> float:
    """Mean squared difference between the probability of fake and the label."""
    return float(np.mean((np.asarray(probabilities, dtype=np.float64) - np.asarray(labels)) ** 2))


def reliability(probabilities: ArrayLike, labels: ArrayLike, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin of the probability of fake: ``count``, ``confidence`` (mean probability) and
    ``frequency`` (fraction of fakes); NaN in the bins with no sample."""
    p, y = np.asarray(probabilities, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    index = np.minimum((p * bins).astype(np.int64), bins - 1)  # p = 1.0 falls in the last bin
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=p, minlength=bins) / count
        frequency = np.bincount(index, weights=y, minlength=bins) / count
    return {"count": count, "confidence": confidence, "frequency": frequency}


def ece(probabilities: ArrayLike, labels: ArrayLike, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the probability of fake (see the module docstring); NaN without samples."""
    table = reliability(probabilities, labels, bins)
    filled = table["count"] > 0
    gaps = np.abs(table["confidence"][filled] - table["frequency"][filled])
    return float(np.sum(gaps * table["count"][filled]) / table["count"].sum()) if filled.any() else float("nan")


def calibration_metrics(probabilities: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """``{"ece", "nll", "brier"}`` (``CALIBRATION``) of probabilities of fake against the labels (1 = fake)."""
    return {key: measure(probabilities, labels) for key, (_, measure) in CALIBRATION.items()}


# key -> (the name a table shows, the measure)
CALIBRATION = {"ece": ("ECE", ece), "nll": ("NLL", nll), "brier": ("Brier", brier)}


def format_calibration(figures: dict[str, float]) -> str:
    """``CALIBRATION``'s figures of a metrics dict as "ECE 0.0123, NLL 0.2345, Brier 0.0678"."""
    return ", ".join(f"{name} {figures[key]:.4f}" for key, (name, _) in CALIBRATION.items())


def fit_temperature(logits: ArrayLike, labels: ArrayLike) -> float:
    """The T > 0 that minimises the NLL of ``sigmoid(logits / T)`` on these (validation) labels: a bounded
    scalar search on log T (``LOG_T_BOUND``); 1.0 when the labels hold a single class (nothing to fit)."""
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if len(np.unique(y)) < 2:
        return 1.0

    def loss(log_t: float) -> float:  # mean of log(1 + e^s) - y s with s = z / T, without overflow
        scaled = z / np.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, scaled) - y * scaled))

    found = minimize_scalar(loss, bounds=(-LOG_T_BOUND, LOG_T_BOUND), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(found.x))


def parse_band(text: str) -> tuple[float, float]:
    """``"LO,HI"`` (0 <= LO <= HI <= 1) as a pair of floats; a one-line ``UserError`` for anything else."""
    parts = text.split(",")
    try:
        low, high = (float(part) for part in parts)
    except ValueError:
        low = high = float("nan")
    if not 0.0 <= low <= high <= 1.0:
        raise UserError(f"--unsure {text}: give LO,HI with 0 <= LO <= HI <= 1, e.g. 0.4,0.6")
    return low, high
