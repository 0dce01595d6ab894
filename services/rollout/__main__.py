"""`python -m services.rollout --config FILE [--set KEY=VALUE ...] [--address HOST:PORT]`: serve rollouts."""

import sys

from services.rollout.server import main

sys.exit(main())
