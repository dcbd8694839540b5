"""python -m vstream <command> [options]: see `vstream.cli`."""

import sys

from vstream.cli import main

if __name__ == "__main__":
    sys.exit(main())
