"""Lightning's WandbLogger with two changes: run tags from the config, and no `anonymous` setting.

* `extra_tags` (the config's `tags`, see conf/logger/wandb.yaml) join the logger's own tags
  (method, task, model), so `tags=[baseline,v2]` filters runs in wandb as in results.json.
* Lightning passes `anonymous=None` to `wandb.init`, which wandb (>= 0.19) answers with
  "WARNING The anonymous setting has no effect and will be removed"; the key is dropped.
"""

from __future__ import annotations

from typing import Any, Iterable

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


class WandbLogger(_LightningWandbLogger):
    def __init__(self, *args: Any, tags: Iterable[str] | None = None, extra_tags: Iterable[str] | None = None,
                 **kwargs: Any):
        merged = [str(t) for t in [*(tags or []), *(extra_tags or [])]]
        merged = list(dict.fromkeys(merged))  # once each, in order
        super().__init__(*args, tags=merged or None, **kwargs)
        if not kwargs.get("anonymous"):
            self._wandb_init.pop("anonymous", None)
