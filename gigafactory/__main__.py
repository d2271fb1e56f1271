"""`python -m gigafactory ...`: the same entry point as the `gigafactory` script."""

import sys

from gigafactory.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
