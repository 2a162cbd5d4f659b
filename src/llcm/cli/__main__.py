"""python -m llcm.cli ... (as accelerate launch -m llcm.cli ... needs)."""

import sys

from llcm.cli import main

sys.exit(main())
