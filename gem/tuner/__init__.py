"""GEM as a PEFT tuner: `GemConfig`, `select_entries`, and its entry in PEFT's tables.

PEFT's `register_peft_method` accepts only names of its closed `PeftType` enum, so a
third-party tuner has to enter the enum itself. This is the one place that does it:
`_register()` adds the member `PeftType.GEM` and then registers config, tuner and prefix
through PEFT's own `register_peft_method`. It is tested against the peft versions in
`SUPPORTED_PEFT` (the same range as pyproject.toml); on any other version nothing is
registered and every GEM entry point (`GemConfig(...)`, hence `get_peft_model`,
`PeftModel.from_pretrained`, `run.py method=gem`) fails with a message saying so, while
`import gem` and the other methods keep working.
"""

from __future__ import annotations

SUPPORTED_PEFT = ">=0.21.2,<0.22"  # keep equal to the peft pin in pyproject.toml
GEM_PEFT_TYPE = None  # PeftType.GEM once registered


def peft_version() -> str:
    from importlib.metadata import version

    return version("peft")


def peft_version_supported(installed: str | None = None) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    return Version(installed or peft_version()) in SpecifierSet(SUPPORTED_PEFT)


def check_peft_version() -> None:
    """Raise unless GEM's PEFT tuner is registered (the installed peft is in the tested range)."""
    if GEM_PEFT_TYPE is None:
        raise RuntimeError(f"GEM's PEFT tuner supports peft {SUPPORTED_PEFT} (tested); peft {peft_version()} is "
                           f"installed. Install a supported version (pip install 'peft{SUPPORTED_PEFT}'); the other "
                           f"methods of run.py work with any peft")


def _register() -> None:
    global GEM_PEFT_TYPE
    if not peft_version_supported():
        return
    from peft.utils import register_peft_method
    from peft.utils.peft_types import PeftType

    if "GEM" not in PeftType.__members__:
        member = str.__new__(PeftType, "GEM")
        member._name_, member._value_ = "GEM", "GEM"
        member._sort_order_ = len(PeftType._member_names_)
        PeftType._member_map_["GEM"] = member
        PeftType._value2member_map_["GEM"] = member
        PeftType._member_names_.append("GEM")
        type.__setattr__(PeftType, "GEM", member)
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    if PeftType.GEM not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name="gem", config_cls=GemConfig, model_cls=GemModel, prefix=PREFIX)
    GEM_PEFT_TYPE = PeftType.GEM


from gem.tuner.config import GemConfig, GemConfigError  # noqa: E402
from gem.tuner.layer import GemLinear, gem_modules  # noqa: E402
from gem.tuner.model import PREFIX, GemModel, read_adapter_entries  # noqa: E402
from gem.tuner.select import Selection, select_entries  # noqa: E402

_register()

__all__ = ["GemConfig", "GemConfigError", "GemLinear", "GemModel", "gem_modules", "Selection", "select_entries",
           "read_adapter_entries", "SUPPORTED_PEFT", "check_peft_version", "peft_version_supported"]
