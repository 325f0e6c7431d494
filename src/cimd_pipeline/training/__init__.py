"""Model-agnostic training: EMA, atomic checkpoints with exact resume, device and precision."""
