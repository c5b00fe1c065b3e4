import sys

from clipposter.cli.main import main

sys.exit(main())
