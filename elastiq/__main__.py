"""``python -m elastiq`` is the ``elastiq`` command."""

import sys

from .cli import main

sys.exit(main())
