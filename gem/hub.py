"""Whether the Hugging Face Hub may be asked: one rule for models and for datasets.

`HF_HUB_OFFLINE` forbids the Hub for everything; `TRANSFORMERS_OFFLINE` for models only and
`HF_DATASETS_OFFLINE` for datasets only, as the libraries that read them mean it.
"""

from __future__ import annotations

import os

OFFLINE_VARIABLES = {"models": ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"),
                     "datasets": ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
_TRUE = {"1", "true", "yes", "on"}


def hub_offline(what: str) -> bool:
    """Whether the environment forbids the Hub for `what` (`models` or `datasets`)."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in OFFLINE_VARIABLES[what])
