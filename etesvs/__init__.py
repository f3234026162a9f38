"""ETESVS: temporal action segmentation and localization as a reproducible DVC pipeline."""

__version__ = "0.1.0"
