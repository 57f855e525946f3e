"""Transforms of the model that keep its outputs (gate folding) or change them on purpose before pruning
(compensation). Each returns a new model; the pipeline then matches the blocks again."""
