"""Writers: where interval reports go (local store, TensorBoard, wandb, console)."""
