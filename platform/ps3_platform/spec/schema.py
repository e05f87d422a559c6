"""JSON Schema of job specs, generated from the pydantic models (editors validate with it)."""

from __future__ import annotations

from pydantic import TypeAdapter

from .models import API_VERSION, Pipeline, TrainingJob


def job_schema() -> dict:
    schema = TypeAdapter(TrainingJob | Pipeline).json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"ps3-platform job spec ({API_VERSION})"
    return schema
