"""The training engine and its parts: losses, optimizers, schedules, callbacks, checkpoints."""
