import sys

from adamnx.cli import main

sys.exit(main())
