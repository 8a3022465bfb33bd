"""Requests and responses of the OpenAI-compatible routes, in OpenAI's own shapes.

The request models accept what the official ``openai`` client sends for chat
completions, completions and embeddings. Unknown fields are refused (400 naming the
param, as OpenAI answers); fields kiln cannot honour are accepted in shape and refused
with a clear 400 by :mod:`kiln.serve.openai` (``tools``, ``echo``, ``suffix``,
``logit_bias``). ``response_format`` (text, json_object, json_schema), the penalties and
``logprobs`` are served.

The response models serialise exactly as OpenAI's (``object`` tags, ``created`` in
Unix seconds, ``usage``), so the client parses them into its own types.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 8  # choices per request: each one is a sequence in the engine
MAX_STOP = 4  # stop strings, as OpenAI allows
MAX_EMBEDDING_INPUTS = 2048  # as OpenAI allows
MAX_SEQUENCES = 64  # prompts x n of one completion request: each is a sequence in the engine

FinishReason = Literal["stop", "length"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- requests -------------------------------------------------------------------------


class TextPart(BaseModel):
    """One part of a message's content; only text parts exist in this slice."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a chat. ``developer`` is read as ``system`` (as OpenAI does for
    models without a separate developer role); ``name`` is accepted and not rendered."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined without separator)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema the answer must match. ``strict`` is
    accepted and changes nothing: the schema is always enforced during decoding."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, object] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``{"type": "text"}`` (free text), ``{"type": "json_object"}`` (any JSON object)
    or ``{"type": "json_schema", "json_schema": {name, schema, strict}}``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


Stop = str | Annotated[list[str], Field(max_length=MAX_STOP)] | None


class _Sampling(_Request):
    """The sampling fields chat completions and completions share."""

    model: str = Field(min_length=1, description="The deployment's name.")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: Stop = None
    # +-(2^53 - 1): exact in any JSON reader's numbers (2^63 - 1 is not a double), and
    # choice i samples with seed + i, which torch's generators take
    seed: int | None = Field(default=None, ge=-(2**53 - 1), le=2**53 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        default=None, max_length=0, description="Not supported: null or {}."
    )
    user: str | None = None

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _no_logit_bias(cls, value: object) -> object:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    def stop_strings(self) -> list[str] | None:
        """``stop`` as a list (None: the bundle's own stop strings)."""
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, object]] | None = Field(
        default=None, max_length=0, description="Not supported: null or []."
    )
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("tools", "tool_choice", mode="before")
    @classmethod
    def _no_tools(cls, value: object) -> object:
        if value and value != "none":
            raise ValueError("tools are not supported")
        return value


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` as text, texts, token ids or lists of them."""

    prompt: str | list[str] | TokenIds | list[TokenIds]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings``: ``input`` as text, texts, token ids or lists of them."""

    model: str = Field(min_length=1, description="The deployment's name.")
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


# ---- responses ------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class TopLogprob(BaseModel):
    """A candidate token: text, log-probability, UTF-8 bytes (as OpenAI's)."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    """A generated token with its ``top_logprobs`` alternatives (best first)."""

    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """``choices[].logprobs`` of a chat answer (or of one streamed delta)."""

    content: list[ChatTokenLogprob] | None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    """``choices[].logprobs`` of a legacy completion: per generated token its text, its
    log-probability, its top alternatives (text -> logprob) and its character offset in
    the choice's text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


def _is_none(value: object) -> bool:
    return value is None


class ChunkDelta(BaseModel):
    """What a chunk adds to a choice; the fields it does not set are left out (a
    choice's last chunk carries ``"delta": {}``, as OpenAI's)."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=_is_none)
    content: str | None = Field(default=None, exclude_if=_is_none)


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    """A completion, and also each chunk of a streamed one (as OpenAI sends them)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class CreateEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """``{"error": {"message", "type", "param", "code"}}``: what OpenAI answers on errors."""

    error: ErrorDetail
