"""Deprecated: sweep summaries moved to :mod:`msn.cli.sweep` (the Hydra target ``msn.sweep.SweepSummary`` and
``python -m msn.sweep`` keep working). This alias goes in the next release."""

import warnings

from msn.cli.sweep import SweepSummary, main, summarize_job, write_summary

__all__ = ["SweepSummary", "main", "summarize_job", "write_summary"]

if __name__ == "__main__":
    main()
else:
    warnings.warn(f"importing from {__name__} is deprecated; import from msn.cli.sweep", FutureWarning,
                  stacklevel=2)
