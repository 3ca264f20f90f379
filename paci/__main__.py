import sys

from paci.cli import main

sys.exit(main())
