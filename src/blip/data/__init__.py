"""Datasets: the synthetic shapes world (`blip.data.shapes`) and loaders for image-text manifests."""
