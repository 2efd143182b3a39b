"""One rank of ``hyperdiff run`` for tests/test_distributed_failures.py, started by torchrun
(or with its variables set by hand): rank 1 sends itself SIGNAL once it has arrived at the
gather of outer step 1, so rank 0 is then waiting inside the backend's all-gather.

    python tests/torchrun_rank.py SIGNAL OUT [--set KEY=VALUE ...]
"""

from __future__ import annotations

import os
import signal
import sys
import time

from hyperdiff.app.cli import main
from hyperdiff.tuner.distributed import Group


def signal_myself_after_barrier(name: str, where: str = "outer step 1") -> None:
    """Rank 1 prints the time and sends itself signal ``name`` after the barrier ``where``."""
    barrier = Group.barrier

    def arrive(self: Group, at: str) -> None:
        barrier(self, at)
        if at == where:
            print(f"rank 1 sends itself {name} at {time.time():.3f}", file=sys.stderr,
                  flush=True)
            os.kill(os.getpid(), getattr(signal, name))

    Group.barrier = arrive  # type: ignore[method-assign]


if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        signal_myself_after_barrier(sys.argv[1])
    sys.exit(main(["run", "--out", sys.argv[2], *sys.argv[3:]]))
