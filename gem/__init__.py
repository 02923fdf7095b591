"""GEM: gradient-to-weight ratio and entropy-guided sparse fine-tuning, and the baselines it is compared with."""

__version__ = "0.1.0"

from gem.config import register_resolvers as _register_resolvers

_register_resolvers()
