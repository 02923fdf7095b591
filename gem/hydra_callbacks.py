"""Hydra callbacks: what must happen before Hydra writes into the run folder.

Hydra saves `.hydra/{config,hydra,overrides}.yaml` into the run folder before the job
starts. When that folder holds a completed run the job will refuse to start
(`gem.run_checks`), and the completed run's saved command must survive the attempt: the
callback turns the saving off for that job. With `overwrite=true` it keeps a copy of the
completed run's `.hydra/`, put back if the new run's settings fail their checks. (Hydra only
warns about exceptions raised in callbacks, so the refusal itself stays in `gem.train.run`.)
Multirun job folders are not known at this point; records keep their own command
(`overrides`) for that case.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from gem.run_checks import HYDRA_BACKUP, RunSetupError, check_not_completed


class ProtectCompletedRuns(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
            record = check_not_completed(run_dir, bool(config.get("ckpt_path")), config.get("overwrite", False))
            if record and record.get("status") == "completed" and (run_dir / ".hydra").is_dir():
                # overwrite=true: keep the completed run's .hydra/ until the new run passes its checks
                # (gem.train.run restores it if they fail, removes it once they pass)
                shutil.rmtree(run_dir / HYDRA_BACKUP, ignore_errors=True)
                shutil.copytree(run_dir / ".hydra", run_dir / HYDRA_BACKUP)
        except RunSetupError:
            with open_dict(config):
                config.hydra.output_subdir = None  # the job refuses to start; keep the folder's .hydra/
        except Exception:  # an interpolation only Hydra's runtime resolves, say: the job checks itself
            return
