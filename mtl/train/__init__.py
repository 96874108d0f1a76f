"""Training: the pure step, the DeepSpeed engine, the Ray Train loop and the driver."""
