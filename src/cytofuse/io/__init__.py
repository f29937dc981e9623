"""Stage 1, input: image readers and writers (one array layout), image sets (folders, manifests,
labels, groups) and imaging-flow-cytometry montage cutting."""
