"""Load a pre-trained model and its tokenizer for a task, as a model config describes it.

Encoders get a task head (sequence classification / regression / multiple choice) whose
newly initialised parameters are reported in ``head_parameter_names``; decoders are
loaded as causal language models (the task is posed as text), with no new parameters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

from torch import nn

from gem.models.packaged import (
    ModelLoadError,
    model_cfg_to_dict,
    model_kind,
    pretrained_id,
    resolve_model_source,
)

__all__ = ["LoadedModel", "ModelLoadError", "load_model", "load_tokenizer", "normalize_task_kind",
           "new_parameter_names"]

_log = logging.getLogger(__name__)

_TASK_ALIASES = {
    "classification": "classification",
    "single_label_classification": "classification",
    "cls": "classification",
    "seq_cls": "classification",
    "regression": "regression",
    "multiple_choice": "multiple_choice",
    "multiple-choice": "multiple_choice",
    "multiplechoice": "multiple_choice",
    "mc": "multiple_choice",
}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    # Names (as in model.named_parameters()) of the newly initialised task-head parameters.
    head_parameter_names: list[str]
    # Number of distinct parameter entries (tied weights counted once).
    num_parameters: int
    # Where the weights came from: a local folder or a Hub id.
    source: str
    kind: str = "encoder"
    # The config's `pretrained` value (e.g. "packaged:minilm", "roberta-base", "tiny:llama").
    pretrained: str = ""
    extras: dict = field(default_factory=dict)


def normalize_task_kind(task_kind: str) -> str:
    key = str(task_kind).strip().lower()
    return _TASK_ALIASES.get(key, key)


def new_parameter_names(model: nn.Module, missing_keys: Iterable[str]) -> list[str]:
    """Map ``missing_keys`` from ``from_pretrained(..., output_loading_info=True)`` to parameter names.

    Buffers are dropped, and so is a parameter tied to one that was loaded (it is not new).
    The result follows ``model.named_parameters()`` order.
    """
    names = [n for n, _ in model.named_parameters()]  # tied parameters appear once
    name_set = set(names)
    wanted: set[str] = set()
    for key in missing_keys:
        if key in name_set:
            wanted.add(key)
            continue
        # A key whose prefix differs from the module's (base-model prefix added or dropped).
        matches = [n for n in names if n.endswith("." + key) or key.endswith("." + n)]
        if len(matches) == 1:
            wanted.add(matches[0])
    return [n for n in names if n in wanted]


class _LoadReport:
    """Holds back transformers' load report (a table of every missing key, logged as a warning) while a
    model loads, then says in one line what it means when it is expected: an encoder's new task head.
    Anything else the report names (an unexpected or mismatched key, a missing weight outside the
    head, a decoder's missing weight) is logged as transformers wrote it. The loading progress bar
    is off meanwhile."""

    _LOGGER = "transformers.modeling_utils"

    def __init__(self):
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.held.append(record)
            return False
        return True

    def __enter__(self) -> "_LoadReport":
        from transformers.utils import logging as hf_logging

        self._bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        logging.getLogger(self._LOGGER).addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        from transformers.utils import logging as hf_logging

        logging.getLogger(self._LOGGER).removeFilter(self)
        if self._bars:
            hf_logging.enable_progress_bar()
        if exc[0] is not None:
            self.release()

    def release(self) -> None:
        logger = logging.getLogger(self._LOGGER)
        for record in self.held:
            logger.handle(record)
        self.held = []

    def explain(self, model: nn.Module, info: dict, head: list[str], kind: str, pretrained: str) -> None:
        if not self.held:
            return
        missing = list(info.get("missing_keys") or ())
        expected = (kind == "encoder" and head and not info.get("unexpected_keys") and not info.get("mismatched_keys")
                    and len(new_parameter_names(model, missing)) == len(missing))
        if not expected:
            self.release()
            return
        self.held = []
        count = sum(p.numel() for n, p in model.named_parameters() if n in set(head))
        _log.info("%s: new task head initialised (%s; %s parameters), as expected for a pre-trained encoder "
                  "fine-tuned on a task; every other weight loaded from %s", type(model).__name__, ", ".join(head),
                  f"{count:,}", pretrained)


def _ensure_pad_token(tokenizer, kind: str) -> None:
    if tokenizer is None or getattr(tokenizer, "pad_token", None) is not None:
        return
    for candidate in ("eos_token", "sep_token", "unk_token", "bos_token"):
        token = getattr(tokenizer, candidate, None)
        if token is not None:
            tokenizer.pad_token = token
            return
    raise ModelLoadError(f"The tokenizer of this {kind} has no pad, eos, sep, unk or bos token to pad with.")


def _set_pad_token_id(model: nn.Module, tokenizer) -> None:
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        return
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = pad_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None:
        gen.pad_token_id = pad_id


def _remote_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in ("trust_remote_code", "revision", "local_files_only") if k in kwargs}


def load_tokenizer(model_cfg: Any):
    """The tokenizer of the model a config names; one without a pad token pads with its eos (else sep,
    unk or bos) token."""
    from transformers import AutoTokenizer

    cfg = model_cfg_to_dict(model_cfg)
    source, kwargs = resolve_model_source(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_remote_kwargs(kwargs))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"Could not load the tokenizer of {pretrained_id(cfg)!r} from {source!r}: {exc}\nOffline, use a packaged "
            "model (model=minilm, model=smollm2-135m or model=gemma3-270m); otherwise check the id and your network."
        ) from exc
    _ensure_pad_token(tokenizer, model_kind(cfg))
    return tokenizer


def load_model(model_cfg: Any, task_kind: str, num_labels: int, label_names: list[str] | None = None) -> LoadedModel:
    """Load the model a config names, shaped for ``task_kind``.

    * encoder + ``classification``: AutoModelForSequenceClassification with ``num_labels``
      (``label_names`` fill id2label / label2id);
    * encoder + ``regression``: the same with one output and ``problem_type="regression"``;
    * encoder + ``multiple_choice``: AutoModelForMultipleChoice;
    * decoder (any task): AutoModelForCausalLM; the tokenizer gets a pad token (its eos)
      if it has none. Padding side is left to the caller.

    Weights are float32 unless the config sets ``dtype``. ``trust_remote_code`` is passed
    only when the config sets it. Raises ``ModelLoadError`` with advice when the model
    cannot be found (e.g. a Hub id while offline).
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMultipleChoice,
        AutoModelForSequenceClassification,
    )

    cfg = model_cfg_to_dict(model_cfg)
    pretrained = pretrained_id(cfg)
    kind = model_kind(cfg)
    task = normalize_task_kind(task_kind)
    source, kwargs = resolve_model_source(cfg)
    remote = _remote_kwargs(kwargs)

    try:
        tokenizer = load_tokenizer(cfg)
        if kind == "decoder":
            model_cls = AutoModelForCausalLM
            extra: dict[str, Any] = {}
        else:
            config_kwargs: dict[str, Any] = {}
            if task == "classification":
                n = int(num_labels)
                if n < 2:
                    raise ModelLoadError(f"classification needs num_labels >= 2, got {num_labels}.")
                config_kwargs.update(num_labels=n, problem_type="single_label_classification")
                if label_names is not None:
                    if len(label_names) != n:
                        raise ModelLoadError(f"{len(label_names)} label names for {n} labels.")
                    config_kwargs["id2label"] = {i: str(name) for i, name in enumerate(label_names)}
                    config_kwargs["label2id"] = {str(name): i for i, name in enumerate(label_names)}
                model_cls = AutoModelForSequenceClassification
            elif task == "regression":
                config_kwargs.update(num_labels=1, problem_type="regression")
                model_cls = AutoModelForSequenceClassification
            elif task == "multiple_choice":
                model_cls = AutoModelForMultipleChoice
            else:
                raise ModelLoadError(
                    f"An encoder cannot do task kind {task_kind!r}; use classification, regression or "
                    "multiple_choice, or a decoder model."
                )
            config = AutoConfig.from_pretrained(source, **remote, **config_kwargs)
            extra = {"config": config}
        with _LoadReport() as report:
            model, info = model_cls.from_pretrained(source, output_loading_info=True, **kwargs, **extra)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"Could not load model {pretrained!r} from {source!r}: {exc}\nOffline, use a packaged model "
            "(model=minilm, model=smollm2-135m or model=gemma3-270m); otherwise check the id and your network."
        ) from exc

    _set_pad_token_id(model, tokenizer)

    head = new_parameter_names(model, info.get("missing_keys", ()))
    report.explain(model, info, head, kind, pretrained)
    if kind == "decoder" and head:
        # A causal LM checkpoint should cover every parameter; say so loudly but go on.
        import warnings

        warnings.warn(f"{pretrained}: parameters not in the checkpoint were initialised randomly: {head}")
    num_parameters = sum(p.numel() for p in model.parameters())
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        head_parameter_names=head,
        num_parameters=num_parameters,
        source=str(source),
        kind=kind,
        pretrained=pretrained,
        extras={"task_kind": task, "loading_info": {k: sorted(v) for k, v in info.items() if k != "error_msgs"}},
    )


# Models whose position ids start after the padding index (pad_token_id + 1 positions unusable).
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text"}


def model_max_positions(model, tokenizer=None) -> int | None:
    """The longest sequence the model can embed: its position table (and the tokenizer's
    model_max_length when that is a real limit); None when the model states none."""
    config = getattr(model, "config", None)
    limits = []
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(positions, int) and positions > 0:
        if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
            positions -= int(getattr(config, "pad_token_id", None) or 0) + 1
        limits.append(positions)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000:  # transformers' "no limit" is 1e30
        limits.append(tokenizer_limit)
    return min(limits) if limits else None


def fit_max_length(requested: int, model, tokenizer=None) -> tuple[int, str | None]:
    """Clamp a max_length beyond what the model can embed (it would crash on the first long
    example, or silently read garbage positions) to the model's limit; the note says so."""
    if requested < 1:
        raise ValueError(f"task.max_length={requested} must be at least 1")
    limit = model_max_positions(model, tokenizer)
    if limit is None or requested <= limit:
        return requested, None
    return limit, (f"max_length {requested} (task.max_length, or model.max_length for decoders) exceeds what the "
                   f"model can embed ({limit} positions); sequences are truncated to {limit} instead")
