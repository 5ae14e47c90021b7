"""ssgd-dist: S-SGD (symmetrical SGD with weight-noise injection) for distributed large-batch training."""

__version__ = "0.1.0"
