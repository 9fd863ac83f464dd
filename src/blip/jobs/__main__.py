"""`python -m blip.jobs batch ...` and `python -m blip.jobs retrieve ...` (also under torchrun: `-m blip.jobs`)."""

import sys

from blip.jobs.cli import main

sys.exit(main())
