"""Stage 2, preprocessing: z-slice patches, the Otsu sparsity filter, normalisation statistics,
labels from a fluorescence channel and the learned empty-patch filter."""
