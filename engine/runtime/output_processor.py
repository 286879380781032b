"""From sampled token ids to text deltas: incremental detokenization and stop strings, per request."""
from __future__ import annotations

from dataclasses import dataclass

from glmserve.engine.text.detokenizer import IncrementalDetokenizer
from glmserve.engine.core.outputs import CompletionOutput, RequestMetrics, RequestOutput
from glmserve.engine.core.request import FinishReason, Request, RequestKey
from glmserve.engine.text.stop_strings import StopStringMatcher


@dataclass
class _TextState:
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher


@dataclass
class TokenEvent:
    """One sampled token of one request, as the engine step produced it."""

    request: Request
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._states: dict[RequestKey, _TextState] = {}

    def add(self, request: Request) -> None:
        params = request.params
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens,
                                       strip_reply_prefix=params.strip_reply_prefix)
        self._states[request.key] = _TextState(detok, StopStringMatcher(params.stop))

    def process(self, events: list[TokenEvent], finish) -> list[RequestOutput]:
        """Detokenize each event; a matched stop string finishes its request through ``finish(request, reason,
        stop_reason)``. Returns one delta output per event."""
        outputs = []
        for event in events:
            request = event.request
            state = self._states[request.key]
            text, stopped = state.stops.feed(state.detokenizer.add(event.token_id))
            if stopped and not request.is_finished:
                finish(request, FinishReason.STOP, state.stops.matched)
            outputs.append(self._delta(request, [event.token_id], text, event))
        return outputs

    def finished_output(self, request: Request) -> RequestOutput:
        """The closing delta of a request that finished without a new token (an abort)."""
        return self._delta(request, [], "", None)

    def _delta(self, request: Request, token_ids: list[int], text: str, event: TokenEvent | None) -> RequestOutput:
        if request.is_finished:
            state = self._states.pop(request.key, None)
            if state is not None and not state.stops.stopped:
                tail, _ = state.stops.feed(state.detokenizer.flush())
                text += tail + state.stops.flush()
        want_logprobs = request.params.logprobs is not None and event is not None
        completion = CompletionOutput(
            index=request.index, text=text, token_ids=token_ids,
            finish_reason=request.finish_reason.value if request.is_finished else None,
            stop_reason=request.stop_reason,
            logprobs=[event.logprob] if want_logprobs else None,
            top_logprobs=[event.top_logprobs] if want_logprobs else None)
        t = request.times
        metrics = RequestMetrics(t.arrival, t.first_scheduled, t.first_token, t.finished)
        return RequestOutput(request.request_id, request.prompt_token_ids, [completion],
                             request.is_finished, request.num_cached_tokens, metrics)
