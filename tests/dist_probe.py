"""`clap` as torchrun starts it, with a probe on the real embedding (for tests/test_dist_index.py).

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_probe.py index DIR …

Each rank records the paths it was given to embed in $CLAP_PROBE_DIR/rank-R.json; the rank named by
$CLAP_PROBE_FAIL_RANK fails as a real one might (an exception from its embedding);
$CLAP_PROBE_EXACT_BELOW overrides `clapcli.index.ann.EXACT_BELOW`;
$CLAP_PROBE_FULL_DISK_AFTER=N makes rank 0's store raise ENOSPC on the file row after the first N (a disk
that fills up during the merge); $CLAP_PROBE_LATE_RANK names a rank whose partition files show up two
seconds after it reported them written (a slow shared filesystem).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import clapcli.index.distributed as distributed
from clapcli.engine.clap import Clap
from clapcli.index.store import IndexStore

RANK = int(os.environ["RANK"])
_embed_files = Clap.embed_files


def probed_embed_files(self, paths, *args, **kwargs):
    paths = [os.fspath(p) for p in paths]
    (Path(os.environ["CLAP_PROBE_DIR"]) / f"rank-{RANK}.json").write_text(json.dumps(paths))
    if os.environ.get("CLAP_PROBE_FAIL_RANK") == str(RANK):
        raise RuntimeError("injected failure")
    return _embed_files(self, paths, *args, **kwargs)


Clap.embed_files = probed_embed_files

if RANK == 0 and "CLAP_PROBE_FULL_DISK_AFTER" in os.environ:
    _write_file_row = IndexStore._write_file_row
    _rows_left = [int(os.environ["CLAP_PROBE_FULL_DISK_AFTER"])]

    def full_disk_write_file_row(self, *args, **kwargs):
        if _rows_left[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _rows_left[0] -= 1
        return _write_file_row(self, *args, **kwargs)

    IndexStore._write_file_row = full_disk_write_file_row

if os.environ.get("CLAP_PROBE_LATE_RANK") == str(RANK):
    _write_partition = distributed.write_partition

    def late_write_partition(directory, rank, *args):
        """Write the partition aside; a separate process moves it in place two seconds later."""
        aside = Path(tempfile.mkdtemp(dir=directory.parents[2]))  # beside the index, on its filesystem
        written = _write_partition(aside, rank, *args)
        moves = "; ".join(f"os.replace({str(aside / p.name)!r}, {str(p)!r})"
                          for p in distributed.partition_paths(directory, rank))
        subprocess.Popen([sys.executable, "-c", f"import os, time; time.sleep(2); {moves}"])
        return written

    distributed.write_partition = late_write_partition
if "CLAP_PROBE_EXACT_BELOW" in os.environ:  # write the hnswlib file even for a tiny index
    import clapcli.index.ann as ann

    ann.EXACT_BELOW = int(os.environ["CLAP_PROBE_EXACT_BELOW"])

from clapcli.cli.main import main  # noqa: E402 - after the probe is in place

main()
