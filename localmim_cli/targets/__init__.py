"""Reconstruction targets: what each local decoder learns to predict, per cell of pixels."""
