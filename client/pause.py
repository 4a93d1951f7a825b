"""Named points where a test stops the agent, to kill it exactly there. For tests only.

    HERALD_TEST_PAUSE=install:37 HERALD_TEST_PAUSE_FILE=/tmp/paused herald agent ...

makes the 37th pass through the point `install` write `install:37` to the file, then sleep
until the process is killed: a kill -9 then lands inside the install, and the test knows it.
Without HERALD_TEST_PAUSE (always, outside tests) a point costs one comparison.

The points: `install` and `restore` (after each file a converge writes, removes or puts back,
while installing a generation or returning to one), `rebuilt` (the rebuild command succeeded,
nothing recorded yet), `switched-back` (a restore's switch back was tried and journaled, the
files not yet settled), `settle` (a step's outcome recorded, what the root holds and the
journal not yet).
"""

import os
import time
from pathlib import Path
from typing import Final

_SPEC: Final = os.environ.get("HERALD_TEST_PAUSE", "")
_FILE: Final = os.environ.get("HERALD_TEST_PAUSE_FILE", "")
_NAME, _, _COUNT = _SPEC.partition(":")
_passes: dict[str, int] = {}


def at(point: str) -> None:
    """Pass point `point`: stop here for good if the test asked for this pass."""
    if point != _NAME:
        return
    _passes[point] = count = _passes.get(point, 0) + 1
    if count != int(_COUNT or "1"):
        return
    if _FILE:
        Path(_FILE).write_text(f"{point}:{count}\n", encoding="utf-8")
    while True:  # until killed: a test's kill -9 lands here
        time.sleep(3600)
