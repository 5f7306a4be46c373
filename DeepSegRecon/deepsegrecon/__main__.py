"""``python -m deepsegrecon`` is the ``deepsegrecon`` command."""

import sys

from .cli import main

sys.exit(main())
