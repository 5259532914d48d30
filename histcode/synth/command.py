"""``histcode synth``: write a synthetic cohort (:func:`histcode.synth.cohort.make_cohort`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histcode.commandkit import CommandResult, adapter, run_function

if TYPE_CHECKING:
    from histcode.synth.cohort import Cohort


def _synth_outcome(cohort: Cohort, out: Path, **_: Any) -> CommandResult:
    """``histcode synth``'s result line, summary details and exit status."""
    from histcode.synth.cohort import describe

    written = set(cohort.written)
    details = {
        "slides": [
            {**row, "status": "written" if row["slide_id"] in written else "skipped"}
            for row in cohort.slides
        ],
        "genes": cohort.genes,
    }
    return CommandResult(out_dir=Path(out), result=describe(cohort), details=details)


def main(argv: Sequence[str], prog: str = "histcode synth") -> int:
    """Entry point of ``histcode synth``: :func:`~histcode.synth.cohort.make_cohort` as a
    command (imported here, so that ``histcode --help`` stays light)."""
    from histcode.synth.cohort import make_cohort

    synth = adapter(make_cohort, _synth_outcome, skip=["on_slide"])
    return run_function(synth, argv, prog, "synth")
