"""Models: the ViT, its heads, and the loader for converted checkpoints."""
