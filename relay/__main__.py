"""``python -m relay``: the ``virt-relay`` command line."""

import sys

from relay.app.cli import main

sys.exit(main())
