"""How FusionTree's command lines end on a mistake of their user: one line, exit status 2.

FusionTree raises ValueError for bad config or input, with the fix in its message, and keeps
assert and the other exceptions for its own bugs (house style). `run_main(main)` runs an
entry point's main function accordingly: a ValueError raised by FusionTree's own code (the
package, launch/, data_pipeline/) prints `<script>: error: <message>` as one line on stderr
and exits 2, like argparse's usage errors, without a traceback; every other exception,
a library's ValueError included, keeps its traceback. FUSIONTREE_TRACEBACK=1 shows the
traceback of usage errors too.

This module imports nothing, so that a script can use it before its heavy imports.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
OWN_CODE = (ROOT / "fusiontree", ROOT / "launch", ROOT / "data_pipeline")
USAGE_ERROR_STATUS = 2


def raised_by_own_code(error: BaseException) -> bool:
    """Whether the innermost frame of `error`'s traceback is FusionTree's code."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    return any(path.is_relative_to(d) for d in OWN_CODE)


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """`main(argv)`'s exit status; a usage error (see the module docstring) becomes one line
    on stderr and status 2."""
    try:
        return main(argv)
    except ValueError as e:
        if not raised_by_own_code(e) or os.environ.get("FUSIONTREE_TRACEBACK"):
            raise
        print(f"{Path(sys.argv[0]).name}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return USAGE_ERROR_STATUS
