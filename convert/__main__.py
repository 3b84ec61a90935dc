"""`python -m nemojax.convert HF_DIR OUT_DIR [...]`, the same as `nemojax convert`."""

import sys

from nemojax.convert.cli import main

sys.exit(main())
