"""aidetect: train and evaluate detectors of AI-generated images on 1..N GPUs and SLURM clusters."""

__version__ = "0.1.0"
