"""Stage 2: the training loop and what it is built from (objective, optimizers, sharding, checkpoints...)."""
