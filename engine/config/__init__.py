"""Typed configuration: the ChatGLM3 model's config.json, the engine's settings, and the one definition of the engine
options that the CLI flags and ``LLM(...)`` keywords derive from."""
