"""mitigate: training-free hallucination mitigation for Hugging Face vision-language models.

>>> from mitigate import apply_mitigation
>>> handle = apply_mitigation(model, "var")   # model.generate(...) is now mitigated
>>> handle.remove()                           # the model is exactly as before
"""

from .api import Mitigation, apply_mitigation, get_mitigation, mitigated, remove_mitigation
from .errors import ConfigError, MitigationError, UnknownMethodError, UnsupportedModelError
from .methods import list_methods, list_presets

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Mitigation",
    "MitigationError",
    "UnknownMethodError",
    "UnsupportedModelError",
    "apply_mitigation",
    "get_mitigation",
    "list_methods",
    "list_presets",
    "mitigated",
    "remove_mitigation",
]
