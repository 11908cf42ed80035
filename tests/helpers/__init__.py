"""Helpers that several test modules share; conftest.py puts tests/ on ``sys.path`` (and pytest's
``pythonpath`` setting does too), so a test module imports them as ``from helpers.commands import run_cli``.
None imports submitit or wandb: tests/test_gpu.py runs on GPU images without them."""
