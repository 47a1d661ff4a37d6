"""Training: data sets, the training loop, evaluation and checkpoints."""
