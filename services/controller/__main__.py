"""`python -m services.controller`: see services/controller/server.py."""

import sys

from services.controller.server import main

sys.exit(main())
