"""Backbones that can run on visible tokens only; ViT is built in, others arrive as plugins."""
