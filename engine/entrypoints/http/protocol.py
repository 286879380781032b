"""The request bodies of OpenAI's Chat Completions and Completions APIs, as far as glmserve serves them.

Validated strictly (a string is not a number, 1.0 is not an integer), so a client bug is reported, not guessed
at. Fields OpenAI defines that would change the output but that glmserve cannot honour are declared here and
refused by the conversion with a message naming them; other unknown fields are ignored, as OpenAI-compatible
servers do, so that clients sending extra bookkeeping (``metadata``, ``store``, ...) keep working.
vLLM's sampling extras are accepted under vLLM's names.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool | None = None


class SamplingFields(_Body):
    """What both APIs share: the model, sampling, streaming, and vLLM's extras."""

    model: str | None = None                     # None: the served model
    n: int | None = None                         # null means the default, as everywhere below
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None                      # accepted (a tag for the caller's own records), not used
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None   # refused unless empty
    # vLLM's extras, under vLLM's names
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    priority: int | None = None                  # lower runs first (the gRPC API's priority)
    return_token_ids: bool | None = None         # each choice carries its token ids (vLLM's name)
    # Structured outputs (http/structured.py checks the shapes; the engine checks the values, naming the field)
    response_format: dict[str, Any] | None = None     # OpenAI's: text, json_object, json_schema
    structured_outputs: dict[str, Any] | None = None  # vLLM's: one of json, regex, choice, grammar, json_object
    guided_json: Any = None                           # vLLM's older names for the same
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None


# ---- chat ---------------------------------------------------------------------------------------------------------
class ContentPart(_Body):
    type: str
    text: str | None = None


class FunctionCall(_Body):
    name: str
    arguments: str                               # a JSON object, as a string (OpenAI's convention)


class ToolCallIn(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None   # assistant
    tool_call_id: str | None = None              # tool


class FunctionDefinition(BaseModel):
    """Shown to the model as is (ChatGLM3's tools prompt is the JSON of these objects)."""

    model_config = ConfigDict(strict=True, extra="allow")
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class ChatCompletionRequest(SamplingFields):
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None     # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None   # "none", "auto", "required", or a function by name


# ---- completions --------------------------------------------------------------------------------------------------
class CompletionRequest(SamplingFields):
    # A string, a list of strings, a list of token ids, or a list of such lists: checked by the conversion, which
    # names the offending element.
    prompt: Any
    max_tokens: int | None = 16                  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool | None = None                     # refused when true
    suffix: str | None = None                    # refused when set
    best_of: int | None = None                   # refused unless it equals n


class LoadLoraAdapterRequest(_Body):
    """vLLM's ``/v1/load_lora_adapter``; ``kind`` (glmserve's) loads a P-tuning v2 checkpoint the same way."""

    lora_name: str
    lora_path: str
    kind: Literal["lora", "ptuning"] | None = None   # default: told by the folder's files


class UnloadLoraAdapterRequest(_Body):
    """vLLM's ``/v1/unload_lora_adapter``."""

    lora_name: str


class TokenizeRequest(_Body):
    """vLLM's ``/tokenize`` (not part of OpenAI's API): a text, or a chat's messages, to the prompt's ids."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    tools: list[Tool] | None = None
    add_special_tokens: bool | None = None       # default: true ([gMASK] sop before a text)
