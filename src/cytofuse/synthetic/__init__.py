"""Synthetic data with known answers: organelle phantoms (the demo) and single-cell tiles."""
