"""What crosses between a frontend and its engine core (a thread of the same process, or a process of its own).

Commands go to the engine core; events come back. One ``StepDone`` per engine step carries every request's delta
of that step, so the number of messages grows with steps, not with tokens or streams.
"""
from __future__ import annotations

from dataclasses import dataclass

from glmserve.engine.core.adapters import AdapterKind
from glmserve.engine.core.outputs import CompletionOutput, RequestOutput
from glmserve.engine.lora.manager import AdapterInfo
from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.runtime.engine_info import EngineInfo, EngineStats


# ---- commands (frontend -> engine core) ---------------------------------------------------------------------------
@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_time: float | None = None
    adapter: str | None = None          # a loaded fine-tune; None: the base model


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class LoadAdapter:
    call_id: int
    name: str
    path: str
    kind: AdapterKind | None = None     # None: told by the folder's files


@dataclass
class UnloadAdapter:
    """Refused (AdapterInUseError) while requests use the adapter, counting AddRequests sent before it."""

    call_id: int
    name: str


@dataclass
class Shutdown:
    pass


Command = AddRequest | AbortRequest | LoadAdapter | UnloadAdapter | Shutdown


# ---- events (engine core -> frontend) -----------------------------------------------------------------------------
@dataclass
class EngineReady:
    """The model is loaded and warmed up."""

    info: EngineInfo
    stats: EngineStats            # the counters after the warm-up (cumulative metrics start from them)


@dataclass
class StepDone:
    outputs: list[RequestOutput]
    stats: EngineStats
    num_step_tokens: int          # tokens computed by the step (prefill chunks plus decodes)
    step_time: float              # time.monotonic() when the step finished (the clock is shared by processes)
    adds_applied: int             # AddRequest commands taken so far (the frontend counts the ones still on the way)

    # Pickled compactly: one tuple per delta, without the prompt (the frontend has it: AsyncEngine puts it back)
    # and with a request's timestamps only on its closing delta, where they are read. Per token, what crosses the
    # pipe is then a few small fields, whatever the prompt's length.
    def __getstate__(self):
        rows = [(out.request_id, out.finished, out.num_cached_tokens, out.metrics if out.finished else None,
                 [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs, c.top_logprobs)
                  for c in out.outputs])
                for out in self.outputs]
        return rows, self.stats, self.num_step_tokens, self.step_time, self.adds_applied

    def __setstate__(self, state) -> None:
        rows, self.stats, self.num_step_tokens, self.step_time, self.adds_applied = state
        self.outputs = [RequestOutput(request_id, None, [CompletionOutput(*sample) for sample in samples], finished,
                                      num_cached, metrics)
                        for request_id, finished, num_cached, metrics, samples in rows]


@dataclass
class RequestFailed:
    """An AddRequest the engine core refused (checked already by the frontend, so this is rare: a race)."""

    request_id: str
    error: BaseException
    adds_applied: int


@dataclass
class StepFailed:
    """A step raised: every request in flight was aborted and is failed with this; the engine goes on."""

    request_ids: list[str]
    message: str
    adds_applied: int
    stats: EngineStats | None = None


@dataclass
class EngineFailed:
    """The engine core cannot go on: it failed to start (``error`` says why: a ConfigError, a CheckpointError...),
    a failed step could not be cleaned up, or its process died."""

    message: str
    error: BaseException | None = None
    failed_step: StepFailed | None = None    # the step whose failure could not be cleaned up, and its requests


@dataclass
class AdapterCallDone:
    """The answer to a LoadAdapter or UnloadAdapter: ``error`` None on success; the fine-tunes loaded now."""

    call_id: int
    info: AdapterInfo | None
    error: BaseException | None
    adapters: tuple[AdapterInfo, ...]
    adds_applied: int
    stats: EngineStats                  # the counters now (a P-tuning prefix pins or frees KV blocks)


Event = EngineReady | StepDone | RequestFailed | StepFailed | EngineFailed | AdapterCallDone
