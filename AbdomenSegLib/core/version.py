"""The engine's version: one number, in exported cards, DICOM SEG files and the package metadata."""

__version__ = "0.1.0"
