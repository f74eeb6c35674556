"""``hydra/sweeper=optuna``: msn's Hydra sweeper on current Optuna (msn/configs/hydra/sweeper/optuna.yaml).

Hydra instantiates a plugin class only from the ``hydra_plugins`` namespace, and it imports every module there when
any Hydra app starts: this module is the thin shell, with cheap imports only. The search itself is
:mod:`msn.sweeps.optuna`, imported when a search starts. (The class lives here, not in a submodule: Hydra registers
a plugin under the module that defines it, and the config names ``hydra_plugins.msn_optuna_sweeper.OptunaSweeper``.)
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """Search the sweep overrides' space with an Optuna study; trial N is job N (``SWEEP_DIR/N``)."""

    def __init__(self, **options: Any) -> None:
        self.options = options  # checked when the search starts (msn.sweeps.optuna.SearchOptions)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        from msn.errors import MSNError
        from msn.sweeps.optuna import OptunaSearch, SearchOptions

        assert self.config is not None and self.hydra_context is not None
        try:
            search = OptunaSearch(SearchOptions.from_config(**self.options), self.config, self.launcher,
                                  self.hydra_context.config_loader, report=_print)
            return search.run(arguments)
        except MSNError as e:  # bad input: msn-pretrain's one line and exit code 1
            print(f"msn-pretrain: error: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
            sys.exit(1)


def _print(line: str) -> None:
    print(line, flush=True)
