"""``python -m gradwatch report RUN_DIR``: the same as the ``gradwatch`` console script."""

import sys

from gradwatch.cli import main

sys.exit(main())
