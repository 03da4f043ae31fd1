"""`python -m cli`: the `fescale` command (what `ray job submit -- fescale ...` runs, too)."""

import sys

from cli.main import main

sys.exit(main())
