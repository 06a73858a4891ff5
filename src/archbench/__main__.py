"""`python -m archbench` runs the command-line interface."""

import sys

from archbench.cli import main

sys.exit(main())
