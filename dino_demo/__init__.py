"""DINO image-similarity demo: retrieval, region search and patch matching."""
