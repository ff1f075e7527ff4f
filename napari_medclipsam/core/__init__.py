"""Pure compute: never imports napari, qtpy or magicgui; torch only inside functions."""
