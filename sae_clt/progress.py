"""Progress bars on stderr (tqdm), quiet when stderr is not a terminal unless forced."""

from __future__ import annotations

import os
import sys


def progress_bar(total: int, desc: str, unit: str = "it", initial: int = 0):
    from tqdm import tqdm

    disable = not sys.stderr.isatty() and not os.environ.get("SAECLT_PROGRESS")
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable, dynamic_ncols=True, leave=False)
