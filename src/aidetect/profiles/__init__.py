"""Bundled cluster profiles (YAML), found by name: ``--profile expanse``."""
