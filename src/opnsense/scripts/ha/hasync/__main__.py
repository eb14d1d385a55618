import sys

from hasync.cli import main

sys.exit(main())
