"""Running a model: inferers and sliding windows, test-time mirroring, the segmenters (one model, ensemble,
cascade) behind `predictor.get_segmenter`, resampling back to the input grid, post-processing and confidence.
"""
