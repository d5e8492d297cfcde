"""``python -m tierserve ...``: the ``tierserve`` command without the console script (e.g. a checkout on
``PYTHONPATH`` that was never pip-installed, as on a lent GPU machine)."""

import sys

from tierserve.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
