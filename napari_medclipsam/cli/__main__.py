"""``python -m napari_medclipsam.cli``: the same as the ``medclipsam`` command."""

import sys

from . import main

sys.exit(main())
