"""`python -m blip.capfilt ...`: the same as `blip capfilt ...`."""

import sys

from blip.capfilt.cli import main

sys.exit(main())
