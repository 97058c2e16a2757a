"""raykd: cross-architecture knowledge distillation for neural passage ranking, on Ray."""

__version__ = "0.1.0"
