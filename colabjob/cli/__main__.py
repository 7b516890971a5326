"""``python -m colabjob.cli``: the same as the ``colabjob`` command."""

import sys

from colabjob.cli import main

sys.exit(main())
