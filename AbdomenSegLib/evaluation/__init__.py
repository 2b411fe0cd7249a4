"""Scoring against a reference: per-organ metrics and the comparison of models."""
