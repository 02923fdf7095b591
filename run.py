"""Entry point: `python run.py method=gem task=sst2` (see README)."""

import hydra
from omegaconf import DictConfig

import gem  # noqa: F401  (registers the config resolvers)
from gem.console import quiet_expected_warnings

quiet_expected_warnings()  # before Hydra imports its plugins (the Optuna sweeper's import warnings)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from gem.console import tidy_console
    from gem.train import run  # imported here so `--help` and config errors answer fast

    tidy_console()  # Hydra has set up logging: one copy of each Lightning line, no tips
    record = run(cfg)
    # The dev score is what a Hydra sweeper should optimise (never the test score).
    return record["metrics"].get(record["main_metric"].replace("test/", "dev/"))


if __name__ == "__main__":
    main()
