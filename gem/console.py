"""What a run prints: one copy of every log line, and none of the expected noise a newcomer
would read as an error. Real warnings stay.

`quiet_expected_warnings()` (at import of run.py, before Hydra loads its plugins) filters
warnings that are expected and say nothing about the run:

* Lightning calling a deprecated torch pytree API (`isinstance(treespec, LeafSpec)`);
* Lightning's `log_every_n_steps` note on small runs (the epoch means are logged regardless);
* SQLAlchemy 2 deprecations raised when the Optuna sweeper (optuna < 3) is imported.

`tidy_console()` (once Hydra has set up logging, inside the job) routes Lightning's log lines
through the root handler only (Lightning adds its own console handler when it is imported before
logging is configured: every line was printed twice) and drops Lightning's advertising tips
("💡 Tip: ... litlogger / litmodels").

The other expected lines are handled where they arise: the transformers load report for a new
task head (`gem.models.loading`: one line instead of a table), the `weights_only` note
(`gem.lit.resume` passes it), wandb's `anonymous` warning (`gem.lit.loggers.WandbLogger`).
"""

from __future__ import annotations

import logging
import warnings

_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
# Loggers Lightning's rank_zero_info writes through.
_TIP_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def quiet_expected_warnings() -> None:
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the "
                                              r"logging interval")
    # optuna 2.x on SQLAlchemy 2 (the in-memory study never touches SQLAlchemy)
    warnings.filterwarnings("ignore", module=r"optuna(\..*)?$", message=r".*declarative_base")
    warnings.filterwarnings("ignore", module=r"optuna(\..*)?$", category=DeprecationWarning)
    warnings.filterwarnings("ignore", module=r"hydra_plugins\.hydra_optuna_sweeper(\..*)?$",
                            category=DeprecationWarning)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip:")


_DROP_TIPS = _DropTips()


def tidy_console() -> None:
    """One copy of each Lightning line (through the root logger's handlers when it has any), no tips."""
    root = logging.getLogger()
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if root.handlers:
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:  # the one Lightning adds at import
                    logger.removeHandler(handler)
            logger.propagate = True
    for name in _TIP_LOGGERS:
        logger = logging.getLogger(name)
        if _DROP_TIPS not in logger.filters:
            logger.addFilter(_DROP_TIPS)
    quiet_expected_warnings()
