"""``python -m cacheagent.cli``: the ``cacheagent`` command."""

import sys

from cacheagent.cli.main import main

sys.exit(main())
