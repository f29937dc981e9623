"""Stage 4, evaluation: metrics and their figures, the handcrafted baseline and probes,
explanations (Grad-CAM, channel importance, embeddings) and the HTML report."""
