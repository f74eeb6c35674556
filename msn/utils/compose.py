"""Composing msn-pretrain's config outside the command line, as Hydra's compose API does: for ``msn.train``
(``msn.train(["experiment=cpu_smoke"])``), ``msn-bench``, ``msn-viz views`` and the tests. Torch-free.

:func:`register_configs` puts the schema (:class:`~msn.config.MSNConfig`) in Hydra's ConfigStore as
``msn_schema`` and registers the resolvers the shipped YAML uses (``${start_time:...}``, ``${msn_run_dir:...}``);
every entry point calls it before composing.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from msn.config import CONFIG_DIR, MSNConfig, to_schema
from msn.utils.runname import run_directory, start_time


def register_configs() -> None:
    """Register the schema and the resolvers with Hydra and omegaconf. Idempotent."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="msn_schema", node=MSNConfig)
    OmegaConf.register_new_resolver("start_time", start_time, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("msn_run_dir", run_directory, replace=True)


def compose_config(overrides: list[str] | tuple[str, ...] = (), *, run_dir: str | None = None,
                   placeholder_root: bool = False) -> DictConfig:
    """The validated msn-pretrain config for ``overrides`` (``["experiment=cpu_smoke", "optim.lr=5e-4"]``).

    ``run_dir``: where the run writes; None: the folder ``msn-pretrain OVERRIDES`` would use
    (``outputs/cpu_smoke_optim.lr-5e-4``: named after the overrides, relative to the current folder), so that a run
    started from Python and from the command line continue each other. ``placeholder_root``: a folder dataset
    without ``data.root`` gets ``.`` (for tools that read no images). A bad override is Hydra's or omegaconf's
    exception; a bad value a :class:`~msn.errors.ConfigError`. Hydra's global state (an application of the
    caller's own that uses Hydra) is as it was afterwards.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    register_configs()
    given = [*overrides, *([f"run_dir={run_dir}"] if run_dir is not None else [])]
    callers_hydra = GlobalHydra.instance().hydra  # an application's own Hydra, set aside while msn's composes
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=given, return_hydra_config=True)
    finally:
        if callers_hydra is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(callers_hydra)
    if run_dir is None:
        hydra_config = HydraConfig.instance()
        callers = hydra_config.cfg
        hydra_config.set_config(cfg)  # what Hydra does before a job: ${hydra:...} then resolves
        try:
            cfg.run_dir = str(OmegaConf.select(cfg, "hydra.run.dir"))
        finally:
            hydra_config.cfg = callers
    task = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}
    task_cfg = OmegaConf.create(task)
    task_cfg.given = list(overrides)  # what the caller set: a fitted recipe (fit) leaves it alone
    if placeholder_root and task_cfg.data.name == "folder" and not task_cfg.data.root:
        task_cfg.data.root = "."
    return to_schema(task_cfg)
