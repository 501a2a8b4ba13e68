"""`python -m saelab.cli` (what torchrun runs: `torchrun … -m saelab.cli train …`)."""

import sys

from saelab.cli import main

sys.exit(main())
