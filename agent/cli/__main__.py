"""`python -m agent.cli`: the `salmonn-live` command."""

import sys

from agent.cli import main

sys.exit(main())
