"""GEM: gradient-to-weight ratio and entropy-guided sparse fine-tuning, and the baselines it is compared with.

The library API (README, "GEM in your own code"): `gem.GemConfig`, `gem.select_entries`, then
`peft.get_peft_model(model, config)`, and `gem.FlatAdamW` to train the deltas. Imported lazily,
so `import gem` stays light and works whatever peft is installed.
"""

__version__ = "0.1.0"

from gem.config import register_resolvers as _register_resolvers

_register_resolvers()

_LIBRARY = {"GemConfig", "GemConfigError", "select_entries", "Selection", "gem_modules"}


def __getattr__(name: str):
    if name == "FlatAdamW":
        from gem.core.flat_adamw import FlatAdamW

        return FlatAdamW
    if name in _LIBRARY:
        import gem.tuner as tuner

        return getattr(tuner, name)
    raise AttributeError(f"module 'gem' has no attribute {name!r}")
