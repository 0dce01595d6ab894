"""`python -m services.learner --config FILE [--set k=v ...] --out DIR [--address HOST:PORT]`: serve the learner."""

import sys

from services.learner.server import main

sys.exit(main())
