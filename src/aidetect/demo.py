"""``aidetect demo``: synthetic data -> pack -> train the ``smoke`` config -> test metrics, on a laptop CPU.

Images are packed as native-resolution crops (``--mode crop``): the synthetic generator's trace is a
period-2 pattern, which survives JPEG but not resizing, like real generators' traces. Training's log
ends with the per-source table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aidetect.config import load_config
from aidetect.data.pack import PackSettings, pack
from aidetect.data.synth import synth
from aidetect.train import train


def demo(out: str = "demo", n: int = 2000, workers: int | None = None, sources: int = 1) -> dict[str, Any]:
    """Re-running continues where it stopped: synthetic data (written with ``sources`` fake sources the
    first time) and shards are reused, training resumes."""
    root = Path(out)
    raw, shards, run = root / "raw", root / "shards", root / "run"
    if not raw.exists():
        print(f"[aidetect] writing {n} synthetic images (and broken files) to {raw}", flush=True)
        synth(raw, n=n, seed=0, defects=True, workers=workers, min_side=128, max_side=320, sources=sources)
    manifest = pack(raw, shards, PackSettings(mode="crop", size=96, shard_size=250), workers=workers, progress=False)
    print(
        f"[aidetect] packed {manifest['samples']} images into {shards}; skipped {len(manifest['skipped'])}, "
        f"repaired {len(manifest['repaired'])} (see {shards / 'manifest.json'})",
        flush=True,
    )
    config = load_config("smoke", {"data.shards": str(shards), "train.out": str(run), "train.resume": "auto"})
    metrics = train(config)
    plots = sorted(p.name for p in run.glob("*.png"))
    print(
        f"[aidetect] test accuracy {metrics['accuracy']:.4f}, AUROC {metrics['auroc']:.4f}; "
        f"metrics in {run / 'test_metrics.json'}, plots in {run}: {', '.join(plots)}"
    )
    return metrics
