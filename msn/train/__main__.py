"""``python -m msn.train`` and ``torchrun -m msn.train``: the ``msn-pretrain`` command (an entry point, like
the console script; no module imports this one)."""

from msn.cli.pretrain import main

if __name__ == "__main__":
    main()
