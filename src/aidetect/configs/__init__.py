"""Bundled run configurations: pass their names to ``aidetect train --config``."""
