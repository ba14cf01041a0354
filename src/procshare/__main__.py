"""``python -m procshare``: see `procshare.cli.main`."""

import sys

from procshare.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
