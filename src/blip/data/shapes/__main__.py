"""`python -m blip.data.shapes ...`: the same as `blip data shapes ...`."""

from blip.data.shapes.cli import cli_main

raise SystemExit(cli_main())
