"""Training: checkpoints (and, as they land, the engine, data, optimisation and distributed helpers)."""
