"""Whole runs built from the stages: grouped cross-validation, the final model on all data, the demo."""
