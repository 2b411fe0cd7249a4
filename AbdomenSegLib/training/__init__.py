"""Training models: configs and recipes, augmentation, synthetic data, the trainers and the export of a package."""
