"""Training: recipe -> run directory -> `deepspeed` launcher -> per-rank worker -> loop."""
