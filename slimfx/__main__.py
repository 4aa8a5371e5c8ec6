"""``python -m slimfx`` runs the command line."""

import sys

from slimfx.cli import main

sys.exit(main())
