"""Stage 3, training: the patch cache a model reads, and fitting one model (recipe, checkpoints,
distillation, class probabilities)."""
