"""Scoring against a reference: per-organ metrics, label conventions named or detected, evaluation tables that count
missed and extra organs apart, and the comparison of our models and of other tools' outputs."""
