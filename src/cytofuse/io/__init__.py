"""Stage 1, input: image readers and writers (one array layout), image sets (folders, manifests,
labels, groups), imaging-flow-cytometry montage cutting and Pascal-VOC box annotations."""
