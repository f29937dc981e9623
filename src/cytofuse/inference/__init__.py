"""Stage 5, inference: trained model folders (model cards, fold ensembles) and whole-image prediction."""
