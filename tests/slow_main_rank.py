"""`clap ARGS` with rank 0's validation delayed by $CLAP_TEST_DELAY seconds, for torchrun: the other ranks
must wait for rank 0's own work, not abort (tests/test_train_cli.py)."""

import os
import time

from clapcli.cli.main import main
from clapcli.train import loop

real_validate = loop.validate


def slow_validate(*args, **kwargs):
    if os.environ.get("RANK") == "0":
        time.sleep(float(os.environ["CLAP_TEST_DELAY"]))
    return real_validate(*args, **kwargs)


loop.validate = slow_validate
main()
