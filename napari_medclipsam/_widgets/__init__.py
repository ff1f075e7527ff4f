"""napari dock widgets (GUI only: they call ``napari_medclipsam.core``)."""
