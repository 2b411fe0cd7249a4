"""AbdomenSeg engine: abdominal organ segmentation and evaluation, importable without Slicer."""

__version__ = "0.1.0"
