"""Sweeps: one experiment spec per combination of a grid of field values, each run through DVC
like any other experiment, and a summary of them all (the FVU–L0 frontier).

``grid`` parses ``--grid FIELD=V1,V2`` and writes the variant specs; ``summary`` reads their
metrics and writes reports/sweeps/<name>/.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SaecltError
from ..spec.project import Paths, find_root
from ..stages.run import run_experiment
from .grid import check_clashes, parse_grid, short_names, variants, write_variants
from .summary import table, write_summary


def run_sweep(base: Path, grid_items: list[str], command: str, dry_run: bool = False, log=print) -> Path | None:
    """Write one spec per combination of ``grid_items`` beside ``base``, run each through
    ``saeclt run`` (DVC skips what is already up to date), then write the summary. Stops at the
    first variant that fails, after summarising the ones that ran. Returns the summary folder
    (None for a dry run)."""
    base = Path(base)
    grid = parse_grid(grid_items)
    found = variants(base, grid)
    if dry_run:
        check_clashes(found)
        for v in found:
            log(f"{v.path}  " + ", ".join(f"{k}={v.values[k]!r}" for k in grid))
        log(f"{len(found)} variants (dry run: nothing written)")
        return None
    write_variants(found, base, command)
    paths = Paths(find_root(base.resolve().parent))
    name = "-".join([base.stem, *short_names(list(grid)).values()])
    done = []
    try:
        for i, v in enumerate(found, start=1):
            log(f"sweep {name}: variant {i}/{len(found)}: {v.id}")
            run_experiment(v.path)
            done.append(v)
    except (SaecltError, KeyboardInterrupt):
        if done:
            out, _ = write_summary(paths, name, command, grid, done)
            log(f"sweep {name}: stopped at variant {len(done) + 1}/{len(found)}; {out / 'sweep.md'} summarises the {len(done)} that ran")
        raise
    out, doc = write_summary(paths, name, command, grid, found)
    log(table(doc))
    log(f"sweep {name}: {out / 'sweep.md'}, {out / 'frontier.svg'}")
    return out
