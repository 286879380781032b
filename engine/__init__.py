"""glmserve.engine: the runtime (config, scheduler, KV blocks, model, sampler, engine loop, server).

The offline API is imported lazily so that ``import glmserve.engine.<module>`` stays cheap.
"""
from __future__ import annotations

__all__ = ["LLM", "SamplingParams", "Engine", "AsyncEngine", "EngineConfig"]


def __getattr__(name: str):
    if name == "LLM":
        from .llm import LLM
        return LLM
    if name == "SamplingParams":
        from .sampling_params import SamplingParams
        return SamplingParams
    if name == "Engine":
        from .engine import Engine
        return Engine
    if name == "AsyncEngine":
        from .async_engine import AsyncEngine
        return AsyncEngine
    if name == "EngineConfig":
        from .config import EngineConfig
        return EngineConfig
    raise AttributeError(name)
