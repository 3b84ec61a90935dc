import sys

from nemojax.cli import main

sys.exit(main())
