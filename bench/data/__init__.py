"""Datasets (uniform uint8 image sets) and how a cell's train set is assembled from them."""
