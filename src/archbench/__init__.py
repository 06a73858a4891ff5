"""archbench: a reproducible benchmark suite for small language-model architectures."""

__version__ = "0.1.0"
