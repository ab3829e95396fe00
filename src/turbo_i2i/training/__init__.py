"""Training: procedural data sets and quality metrics for the built-in model."""
