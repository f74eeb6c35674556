"""``python -m msn.sweep SWEEP_DIR``: rebuild a sweep's ``summary.csv`` and ``summary.json``
(:mod:`msn.cli.sweep`; an entry point, like the console scripts: it exports nothing)."""

if __name__ == "__main__":
    from msn.cli.sweep import main

    main()
