"""From a scan to the model's space: the input checks and resampling pipeline, regions of interest, and labelled
datasets read the same way for training and comparison.
"""
