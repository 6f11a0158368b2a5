"""`rpq` with the wake-up stand-in of `wakeup.py` installed: `python bench/rpq_wakeup.py api --port 8080`.

The stand-in is installed at import, outside the `__main__` guard, on purpose: uvicorn's worker
processes are spawned, and a spawned process runs this file again (as `__mp_main__`) before it
builds its app, so every worker gets the stand-in too.
"""

import sys
from pathlib import Path

# The checkout this file is in, ahead of any installed rpq (benchmarks also measure older checkouts).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import wakeup  # after the path is set

wakeup.install()

if __name__ == "__main__":
    from jobs.cli import run

    run()
