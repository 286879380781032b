"""A library must not change its host's global random state: building an engine core (or an LLM) leaves torch's
global RNG as it was, and the dummy weights depend on the engine's seed alone (drawn from a generator of their
own)."""
from __future__ import annotations

import torch

from glmserve.engine.config.engine_config import CacheConfig, EngineConfig
from glmserve.engine.entrypoints.llm import LLM
from glmserve.engine.runtime.engine_core import EngineCore


def tiny_engine(seed: int) -> EngineCore:
    return EngineCore(EngineConfig(model="glm-tiny", seed=seed, attention_backend="torch",
                               cache=CacheConfig(num_kv_blocks=64)))


def global_rng_states() -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if torch.cuda.is_available():
        states += torch.cuda.get_rng_state_all()
    return states


def assert_untouched(before: list[torch.Tensor]) -> None:
    after = global_rng_states()
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before)), \
        "torch's global RNG state changed"


def weights(engine: EngineCore) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in engine.runner.model.named_parameters()}


def test_building_an_engine_or_llm_leaves_the_global_rng_alone():
    torch.manual_seed(1234)            # the host's own choice, which the library must keep
    before = global_rng_states()
    tiny_engine(seed=7)
    assert_untouched(before)
    LLM("glm-tiny", seed=7, attention_backend="torch", num_kv_blocks=64)
    assert_untouched(before)


def test_dummy_weights_depend_on_the_seed_not_the_global_rng():
    torch.manual_seed(1)
    first = weights(tiny_engine(seed=3))
    torch.manual_seed(2)               # a different global state: the same weights all the same
    torch.rand(17)
    again = weights(tiny_engine(seed=3))
    other = weights(tiny_engine(seed=4))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not any(torch.equal(first[name], other[name]) for name in first if not name.endswith("layernorm.weight"))
