"""The server's errors and the JSON shapes of its API (pydantic models, shown in the OpenAPI docs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ServeError(Exception):
    """A request (or startup input) the server refuses; becomes a JSON error with ``status``."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def error_body(status: int, kind: str, message: str, details: list | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"status": status, "type": kind, "message": message}
    if details:
        error["details"] = details
    return {"error": error}


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"adapter": "rte", "inputs": [["A man is sleeping.", "Nobody sleeps."]]},
            {"adapter": "sst2", "inputs": ["a gripping, funny film", ["dull"]]},
        ]},
    )

    adapter: str = Field(min_length=1, max_length=64, description="Name of a loaded adapter (GET /v1/adapters).")
    inputs: list[str | list[str]] = Field(
        min_length=1,
        description="One entry per row: a text, [text], or [text_a, text_b] for a sentence-pair adapter.",
    )


class Prediction(BaseModel):
    label: str | float = Field(description="The predicted label name; for a regression adapter, the score.")
    scores: dict[str, float] | float = Field(
        description="Softmax probability per label name; for a regression adapter, the raw output.")
    version: str = Field(description="sha256 of the adapter's weights file (weights_sha256) that answered.")


class PredictResponse(BaseModel):
    adapter: str
    version: str
    predictions: list[Prediction]


class AdapterInfo(BaseModel):
    name: str
    task: str | None
    labels: list[str]
    problem_type: str
    num_texts: int | None = Field(description="Texts per row (1 or 2); null when the adapter has no task.json.")
    text_columns: list[str] | None
    max_length: int
    parameters: int = Field(description="Parameters of the adapter itself (the frozen backbone not counted).")
    head_parameters: int = Field(description="Parameters of the adapter's own task head.")
    hash: str = Field(description="sha256 of adapter_model.safetensors (weights_sha256).")
    base_model: str | None


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="Name to serve the adapter under.")
    path: str = Field(min_length=1, max_length=4096, description="Adapter directory, inside --adapter-root.")


class RemoveResponse(BaseModel):
    removed: str


class Stats(BaseModel):
    requests: int = 0
    rows: int = 0
    forward_passes: int = 0
    mixed_forward_passes: int = Field(0, description="Forward passes whose rows used more than one adapter.")
    max_rows_per_pass: int = 0
    max_adapters_per_pass: int = 0


class Health(BaseModel):
    status: str
    version: str
    adapters: int
    stats: Stats


class GenerationStats(BaseModel):
    """Counters of the text-generation server (causal LMs); the base model counts as one adapter."""

    requests: int = 0
    rows: int = Field(0, description="Prompts (a /v1/completions request may carry several).")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batches: int = Field(0, description="model.generate calls; each decodes all its rows together.")
    mixed_batches: int = Field(0, description="Batches whose rows used more than one adapter.")
    max_rows_per_batch: int = 0
    max_adapters_per_batch: int = 0
    cancelled_rows: int = Field(0, description="Rows stopped because their client went away.")
    failed_requests: int = Field(0, description="Requests answered with a 500 because the model failed on them.")


class GenerationHealth(BaseModel):
    status: str
    version: str
    model: str = Field(description="The base model's name (the `model` that selects no adapter).")
    adapters: int
    stats: GenerationStats


class ErrorDetail(BaseModel):
    status: int
    type: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
