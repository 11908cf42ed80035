"""``aidetect audit``: can the label be told from file metadata alone, without a single pixel?

Baselines that see only what each file says about itself (format, size, aspect, JPEG quality, chroma
subsampling, EXIF, mode, padding: ``aidetect.data.fileinfo``) are fitted on the training folds and
scored on the test split: all features together, and each alone. A high AUROC means the classes were
collected differently, and a detector can score well by learning that instead of generator traces.
File size (bytes, bits per pixel) is scored alone but kept out of the joint baseline and the warning:
it follows the pixels as well as the codec (a generator's smoother images compress better), so a
difference there may be the very trace a detector should learn. For each feature the audit also says
whether the pack's settings keep it from the model (``--parity`` re-encodes every image through one
codec; ``--mode crop`` stores square native crops, so no aspect and no padding) or whether it still
reaches the pixels the model sees.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from aidetect import plots
from aidetect.data.degrade import parity_quality
from aidetect.data.manifest import read_manifest, sample_records
from aidetect.data.packformat import AUDIT_FILES, CLASSES
from aidetect.errors import UserError
from aidetect.fileio import atomic_write_json

WARN_AUROC = 0.8  # a metadata-only baseline at or above this on test is reported as a shortcut
CONFINED_SHARE = 0.95  # a metadata value is "confined" to a class when that class holds this share of it
CONFINED_MIN = 10  # ... and this many samples: 10 of one class arise by chance with probability 0.002

# name -> (value from a sample's file facts, categorical?)
FEATURES: dict[str, tuple[Callable[[dict[str, Any]], Any], bool]] = {
    "format": (lambda f: f["format"], True),
    "bytes": (lambda f: math.log10(max(f["bytes"], 1)), False),
    "width": (lambda f: f["width"], False),
    "height": (lambda f: f["height"], False),
    "aspect": (lambda f: f["width"] / f["height"], False),
    "megapixels": (lambda f: f["width"] * f["height"] / 1e6, False),
    "bits_per_pixel": (lambda f: 8 * f["bytes"] / (f["width"] * f["height"]), False),
    "jpeg_quality": (lambda f: f["jpeg_quality"], False),
    "subsampling": (lambda f: f["subsampling"], True),
    "exif": (lambda f: int(f["exif"]), False),
    "mode": (lambda f: f["mode"], True),
    "bits": (lambda f: f["bits"], False),
    "padding": (lambda f: f["padding"], False),
}
CONTENT_FEATURES = ("bytes", "bits_per_pixel")  # depend on pixel content too: scored alone only
CODEC_FEATURES = ("format", "jpeg_quality", "subsampling")
GEOMETRY_FEATURES = ("aspect", "padding")
HIDDEN_FEATURES = ("exif", "bits")  # never in the pixels the model sees
CONFINED_FEATURES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "format": lambda f: f["format"],
    "size": lambda f: f"{f['width']}x{f['height']}",
    "jpeg_quality": lambda f: f["jpeg_quality"],
    "subsampling": lambda f: f["subsampling"],
}


def exposure(feature: str, settings: dict[str, Any]) -> tuple[str, str]:
    """("neutralised" | "reaches" | "hidden" | "content", why) for ``feature`` under a pack's ``settings``."""
    if feature in CONTENT_FEATURES:
        return "content", "follows pixel content as well as codec settings; not part of the joint baseline"
    if feature in CODEC_FEATURES:
        if parity_quality(settings.get("parity", "none")) is not None:
            return "neutralised", f"every image was re-encoded by --parity {settings['parity']}"
        return "reaches", "codec artefacts reach the model; --parity jpeg:Q removes the difference"
    if feature in GEOMETRY_FEATURES:
        if settings["mode"] == "crop":
            return "neutralised", "--mode crop stores square native-resolution crops: no padding, no aspect"
        return "reaches", "resize mode pads to a square: black bars reach the model; --mode crop avoids them"
    if feature in HIDDEN_FEATURES:
        return "hidden", "not in the pixels; a sign the classes were collected differently"
    if feature == "mode":
        return "reaches", "grey, palette or alpha images stay recognisable after conversion to RGB"
    return "reaches", "image size sets the scale of content the model sees; balance sizes or drop a source"


def feature_matrix(records: list[dict[str, Any]]) -> tuple[np.ndarray, list[bool]]:
    """One row per record, one column per feature; categories coded 0..k-1, missing values NaN."""
    columns, categorical = [], []
    for extract, is_category in FEATURES.values():
        values = [extract(r["file"]) for r in records]
        if is_category:
            codes = {v: i for i, v in enumerate(sorted({v for v in values if v is not None}))}
            values = [codes.get(v) for v in values]
        columns.append([np.nan if v is None else float(v) for v in values])
        categorical.append(is_category)
    return np.array(columns, dtype=np.float64).T, categorical


def baseline_auroc(x: np.ndarray, y: np.ndarray, test: np.ndarray, categorical: list[bool]) -> float:
    """Test AUROC of gradient-boosted trees fitted on the rows not in ``test`` (deterministic)."""
    model = HistGradientBoostingClassifier(
        max_iter=100,
        min_samples_leaf=max(1, min(20, int((~test).sum()) // 20)),
        categorical_features=np.array(categorical),
        random_state=0,
    )
    with threadpool_limits(1):  # a few thousand rows: threads cost more than they give (6x, measured on 2 cores)
        model.fit(x[~test], y[~test])
        return float(roc_auc_score(y[test], model.predict_proba(x[test])[:, 1]))


def confined_values(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Formats, sizes, JPEG qualities and subsamplings that (almost) only one class has: at least
    ``CONFINED_SHARE`` of their samples in one class, and held by at least ``CONFINED_MIN`` samples."""
    found = []
    for name, extract in CONFINED_FEATURES.items():
        counts = Counter((extract(r["file"]), r["class"]) for r in records)
        for value in sorted({v for v, _ in counts if v is not None}, key=str):
            by_class = {c: counts[(value, c)] for c in CLASSES}
            total, (class_name, most) = sum(by_class.values()), max(by_class.items(), key=lambda item: item[1])
            if total >= CONFINED_MIN and most / total >= CONFINED_SHARE:
                found.append({"feature": name, "value": value, "class": class_name, "n": total, "share": most / total})
    return sorted(found, key=lambda row: -row["n"])


def audit(shard_dir: str | Path) -> dict[str, Any]:
    """The audit of a pack (see the module docstring): baselines fitted on the folds and scored on test,
    each feature's exposure under the pack's settings, confined values, per-source counts and a
    ``warning`` (None when no baseline reaches ``WARN_AUROC``)."""
    manifest = read_manifest(shard_dir)
    records = sample_records(shard_dir)
    if records and "file" not in records[0]:
        raise UserError(f"{shard_dir}: packed before file metadata was recorded; pack the images again to audit them")
    x, categorical = feature_matrix(records)
    y = np.array([CLASSES[r["class"]] for r in records])
    test = np.array([r["split"] == "test" for r in records])
    if len(set(y[test])) < 2 or len(set(y[~test])) < 2:
        raise UserError(f"{shard_dir}: the test split and the folds must each hold both classes to audit")
    features = {}
    for column, name in enumerate(FEATURES):
        status, why = exposure(name, manifest["settings"])
        auroc = baseline_auroc(x[:, [column]], y, test, [categorical[column]])
        features[name] = {"auroc": auroc, "exposure": status, "why": why}
    joint = [column for column, name in enumerate(FEATURES) if name not in CONTENT_FEATURES]
    overall = baseline_auroc(x[:, joint], y, test, [categorical[column] for column in joint])
    report = {
        "samples": {"folds": int((~test).sum()), "test": int(test.sum())},
        "metadata_auroc": overall,
        "features": features,
        "confined": confined_values(records),
        "sources": manifest["sources"],
        "settings": {k: manifest["settings"].get(k, "none") for k in ("mode", "parity")},
    }
    return report | {"warning": warning(report)}


def warning(report: dict[str, Any]) -> str | None:
    """Plain words for a pack whose metadata gives the label away, or None."""
    if report["metadata_auroc"] < WARN_AUROC:
        return None
    flagged = {n: f for n, f in report["features"].items() if f["auroc"] >= WARN_AUROC and n not in CONTENT_FEATURES}
    named = ", ".join(f"{n} {f['auroc']:.2f}" for n, f in sorted(flagged.items(), key=lambda item: -item[1]["auroc"]))
    reaching = [n for n, f in flagged.items() if f["exposure"] == "reaches"]
    neutralised = [n for n, f in flagged.items() if f["exposure"] == "neutralised"]
    text = (
        f"shortcut: file metadata alone, without a pixel, tells fake from real at test AUROC "
        f"{report['metadata_auroc']:.2f} ({named or 'only in combination'})."
    )
    if neutralised:
        text += f" Neutralised by this pack's settings: {', '.join(neutralised)}."
    if reaching:
        advice = {"codec": "--parity jpeg:95", "geometry": "--mode crop", "size": "balanced sizes or dropping a source"}
        kinds = {"codec" if n in CODEC_FEATURES else "geometry" if n in GEOMETRY_FEATURES else "size" for n in reaching}
        text += (
            f" Still reaching the model: {', '.join(reaching)}; a high accuracy may be these, not generator traces. "
            f"Try {', '.join(advice[k] for k in sorted(kinds))}."
        )
    return text


def format_report(report: dict[str, Any]) -> str:
    """The audit as a short text table."""
    lines = [
        f"metadata-only baselines (fitted on {report['samples']['folds']} fold samples, "
        f"scored on {report['samples']['test']} test samples): all features AUROC {report['metadata_auroc']:.3f}",
        f"  {'feature':<15} {'AUROC':>6}  exposure",
    ]
    for name, feature in sorted(report["features"].items(), key=lambda item: -item[1]["auroc"]):
        lines.append(f"  {name:<15} {feature['auroc']:>6.3f}  {feature['exposure']}: {feature['why']}")
    for row in report["confined"][:8]:
        share = f"{row['share']:.0%} of {row['n']}"
        lines.append(f"  confined: {row['feature']} {row['value']} is {row['class']} in {share}")
    for class_name, sources in report["sources"].items():
        counts = ", ".join(f"{name} {split['total']}" for name, split in sources.items())
        lines.append(f"  {class_name} sources: {counts}")
    if report["warning"]:
        lines.append(f"WARNING: {report['warning']}")
    return "\n".join(lines)


def write_audit(shard_dir: str | Path, out: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """Run the audit and write ``audit.json`` and ``audit.png`` (into ``out``, default the pack folder)."""
    report = audit(shard_dir)
    folder = Path(out or shard_dir)
    folder.mkdir(parents=True, exist_ok=True)
    json_name, plot_name = AUDIT_FILES
    atomic_write_json(folder / json_name, report)
    plots.audit(report, folder / plot_name, WARN_AUROC)
    return report, folder / json_name
