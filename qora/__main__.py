"""`python -m qora`: see qora/cli.py."""

import sys

from qora.cli import main

if __name__ == "__main__":
    sys.exit(main())
