"""Training: batches by step number (data), optimizers (optim, tsignsgd), checkpoints (state), the loop."""
