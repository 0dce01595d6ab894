"""`python -m services.guidance_cache [--address HOST:PORT] [--redis-url URL] ...`: serve the guidance cache."""

import sys

from services.guidance_cache.server import main

sys.exit(main())
