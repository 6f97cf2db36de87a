"""`clap` as torchrun starts it, with a probe on the real embedding (for tests/test_dist_index.py).

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_probe.py index DIR …

Each rank records the paths it was given to embed in $CLAP_PROBE_DIR/rank-R.json; the rank named by
$CLAP_PROBE_FAIL_RANK fails as a real one might (an exception from its embedding);
$CLAP_PROBE_EXACT_BELOW overrides `clapcli.index.ann.EXACT_BELOW`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from clapcli.api import Clap

RANK = int(os.environ["RANK"])
_embed_files = Clap.embed_files


def probed_embed_files(self, paths, *args, **kwargs):
    paths = [os.fspath(p) for p in paths]
    (Path(os.environ["CLAP_PROBE_DIR"]) / f"rank-{RANK}.json").write_text(json.dumps(paths))
    if os.environ.get("CLAP_PROBE_FAIL_RANK") == str(RANK):
        raise RuntimeError("injected failure")
    return _embed_files(self, paths, *args, **kwargs)


Clap.embed_files = probed_embed_files
if "CLAP_PROBE_EXACT_BELOW" in os.environ:  # write the hnswlib file even for a tiny index
    import clapcli.index.ann as ann

    ann.EXACT_BELOW = int(os.environ["CLAP_PROBE_EXACT_BELOW"])

from clapcli.cli.main import main  # noqa: E402 - after the probe is in place

main()
