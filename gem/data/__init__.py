"""The data layer: task configs, local/Hub loading, the sampling protocol, encoder collators.

    from gem.data import load_task, TaskData, DataError, encoder_collator
    task = load_task(cfg.task, data_dir, seed)
"""

from gem.data.collate import EncoderCollator, encoder_collator
from gem.data.loading import hub_offline, load_task, resolve_data_dir
from gem.data.tasks import DataError, TaskData, available_tasks, load_task_config, parse_task_config

__all__ = [
    "DataError", "EncoderCollator", "TaskData", "available_tasks", "encoder_collator", "hub_offline",
    "load_task", "load_task_config", "parse_task_config", "resolve_data_dir",
]
