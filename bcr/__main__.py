import sys

from bcr.cli import main

sys.exit(main())
