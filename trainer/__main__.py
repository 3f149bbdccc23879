"""``python -m ditperf.trainer CONFIG [key=value ...]``: what ``composer -n N -m ditperf.trainer``
runs on each rank (Composer's launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...)."""

import sys

from ditperf.trainer.cli import main

sys.exit(main())
