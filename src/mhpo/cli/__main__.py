"""`python -m mhpo.cli ...` is the `mhpo` command."""

import sys

from mhpo.cli import main

sys.exit(main())
