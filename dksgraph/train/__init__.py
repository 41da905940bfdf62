"""Training: the `train` and `eval` commands, the Trainer (a run from start or resume to the end), the epoch
loop, data, seeding, optimisation, metrics and distributed helpers. Nothing below this layer imports it."""
