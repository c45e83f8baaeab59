"""Per-rank training: models, the loop, checkpoints, metrics, HF export. Imports torch."""
