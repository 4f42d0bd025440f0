"""Data preparation and training datasets."""
