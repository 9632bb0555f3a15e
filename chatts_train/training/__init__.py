"""Training: the run's configuration (and ChatTS-Training's options), the engine, LoRA, the optimizer, the loop,
set-up and end of a run, resume checkpoints and metrics."""
