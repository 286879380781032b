"""The error every configuration check raises."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config.json or a setting that cannot describe a valid ChatGLM3 model or engine."""
