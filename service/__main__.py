"""``python -m service``: the ``iotunnel-service`` command."""

import sys

from service.cli import main

sys.exit(main())
