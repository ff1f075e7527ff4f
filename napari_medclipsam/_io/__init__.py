"""napari reader / writer / sample-data contributions."""
