"""``python -m fastlstm`` runs the same command line as the ``fastlstm`` script."""

import sys

from fastlstm.cli import main

if __name__ == "__main__":
    sys.exit(main())
