import sys

from fournil.cli import main

sys.exit(main())
