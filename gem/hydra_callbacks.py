"""Hydra callbacks: what must happen before Hydra writes into the run folder.

Hydra saves `.hydra/{config,hydra,overrides}.yaml` into the run folder before the job
starts. When that folder holds a completed run the job will refuse to start
(`gem.run_checks`), and the completed run's saved command must survive the attempt: the
callback turns the saving off for that job. (Hydra only warns about exceptions raised in
callbacks, so the refusal itself stays in `gem.train.run`.) Multirun job folders are not
known at this point; records keep their own command (`overrides`) for that case.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from gem.run_checks import RunSetupError, check_not_completed


class ProtectCompletedRuns(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            run_dir = OmegaConf.select(config, "hydra.run.dir")
            check_not_completed(Path(str(run_dir)), bool(config.get("ckpt_path")), config.get("overwrite", False))
        except RunSetupError:
            with open_dict(config):
                config.hydra.output_subdir = None  # the job refuses to start; keep the folder's .hydra/
        except Exception:  # an interpolation only Hydra's runtime resolves, say: the job checks itself
            return
