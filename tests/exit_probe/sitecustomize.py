"""Exit probe for launched test processes (put this folder on PYTHONPATH).

Every process that accelerate launches as a rank (``RANK`` set) records, at interpreter exit,
whether ``torch.distributed`` still held a process group. A live group there is what lets a gloo
worker thread abort the process during finalization, at random; the record shows it every time.
"""

import atexit
import json
import os
import sys


def _record() -> None:
    folder, rank = os.environ.get("KPIG_EXIT_PROBE"), os.environ.get("RANK")
    if not folder or rank is None:  # the launcher itself, or a process outside the test
        return
    dist = sys.modules.get("torch.distributed")
    alive = bool(dist is not None and dist.is_available() and dist.is_initialized())
    with open(os.path.join(folder, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump({"rank": int(rank), "process_group_alive": alive}, handle)


atexit.register(_record)  # registered first, so it runs after the program's own exit handlers
