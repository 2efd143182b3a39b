"""``python -m hyperdiff`` runs the command line."""

import sys

from hyperdiff.app.cli import main

sys.exit(main())
