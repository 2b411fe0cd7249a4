"""The bottom layer: errors, options, the organ table, output channels, size limits, precision, progress, version.

Imports nothing else of the engine.
"""
