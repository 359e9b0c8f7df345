"""Write .cog/openapi_schema.json for predict.py, as `cog build` (cog 0.23.1) would.

cog 0.23 validates inputs in its HTTP server against .cog/openapi_schema.json, which
`cog build` writes from a static reading of predict.py. Without the cog CLI this
script writes the same document from the predictor's signature, read by the cog
0.23.1 Python package (cog._inspector), following the layout of cog's own generator
(pkg/schema/openapi_spec.go in the cog 0.23.1 sources): an Input component with
x-order, title, type, default, description, minimum/maximum and choices as enum
components referenced through allOf.

    python scripts/cog_openapi_schema.py            # write .cog/openapi_schema.json
    python scripts/cog_openapi_schema.py --check    # exit 1 if the file is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / ".cog" / "openapi_schema.json"
EMPTY_OK = {"200": {"description": "Successful Response", "content": {"application/json": {"schema": {}}}}}
VALIDATION_ERROR = {
    "description": "Validation Error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
}


def title(name: str) -> str:
    return " ".join(part.capitalize() for part in name.split("_"))


def input_component(info, Repetition) -> tuple[dict, dict]:
    properties, required, enums = {}, [], {}
    for name, field in info.inputs.items():
        prop = {"x-order": field.order}
        if field.choices:
            enums[name] = {
                "title": name,
                "description": "An enumeration.",
                "enum": list(field.choices),
                "type": field.type.primitive.json_type().get("type", "string"),
            }
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop["title"] = title(name)
            prop.update(field.type.json_type())
        nullable = field.type.repetition in (Repetition.OPTIONAL, Repetition.OPTIONAL_REPEATED)
        has_default = field.default is not None or nullable
        if not has_default and field.type.repetition in (Repetition.REQUIRED, Repetition.REPEATED):
            required.append(name)
        if has_default:
            prop["default"] = field.default
        if nullable:
            prop["nullable"] = True
        for key, attr in (
            ("description", "description"),
            ("minimum", "ge"),
            ("maximum", "le"),
            ("minLength", "min_length"),
            ("maxLength", "max_length"),
            ("pattern", "regex"),
        ):
            value = getattr(field, attr)
            if value is not None:
                # cog's generator writes whole-number bounds as integers
                prop[key] = int(value) if isinstance(value, float) and value.is_integer() else value
        properties[name] = prop
    schema = {"title": "Input", "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema, enums


def build() -> dict:
    sys.path.insert(0, str(ROOT))
    from cog import __version__
    from cog._adt import Repetition
    from cog._inspector import create_predictor

    info = create_predictor("predict", "Predictor")
    inputs, enums = input_component(info, Repetition)
    ref = "#/components/schemas/"
    schemas = {"Input": inputs, "Output": info.output.json_type(), **enums}
    schemas["PredictionRequest"] = {
        "title": "PredictionRequest",
        "type": "object",
        "properties": {"id": {"title": "Id", "type": "string"}, "input": {"$ref": ref + "Input"}},
    }
    response = {"input": {"$ref": ref + "Input"}, "output": {"$ref": ref + "Output"}}
    for key in ("id", "version", "created_at", "started_at", "completed_at", "status", "error", "logs"):
        response[key] = {"title": title(key).replace("Id", "Id"), "type": "string"}
        if key.endswith("_at"):
            response[key]["format"] = "date-time"
    response["metrics"] = {"title": "Metrics", "type": "object"}
    schemas["PredictionResponse"] = {"title": "PredictionResponse", "type": "object", "properties": response}
    schemas["Status"] = {
        "title": "Status",
        "description": "An enumeration.",
        "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
        "type": "string",
    }
    schemas["HTTPValidationError"] = {
        "title": "HTTPValidationError",
        "type": "object",
        "properties": {"detail": {"title": "Detail", "type": "array", "items": {"$ref": ref + "ValidationError"}}},
    }
    schemas["ValidationError"] = {
        "title": "ValidationError",
        "required": ["loc", "msg", "type"],
        "type": "object",
        "properties": {
            "loc": {"title": "Location", "type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
            "msg": {"title": "Message", "type": "string"},
            "type": {"title": "Error Type", "type": "string"},
        },
    }
    paths = {
        "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": EMPTY_OK}},
        "/health-check": {
            "get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get", "responses": EMPTY_OK}
        },
        "/predictions": {
            "post": {
                "summary": "Predict",
                "description": "Run a single prediction on the model",
                "operationId": "predict_predictions_post",
                "requestBody": {"content": {"application/json": {"schema": {"$ref": ref + "PredictionRequest"}}}},
                "responses": {
                    "200": {
                        "description": "Successful Response",
                        "content": {"application/json": {"schema": {"$ref": ref + "PredictionResponse"}}},
                    },
                    "422": VALIDATION_ERROR,
                },
            }
        },
        "/predictions/{prediction_id}/cancel": {
            "post": {
                "summary": "Cancel",
                "operationId": "cancel_predictions__prediction_id__cancel_post",
                "parameters": [
                    {
                        "required": True,
                        "schema": {"title": "Prediction Id", "type": "string"},
                        "name": "prediction_id",
                        "in": "path",
                    }
                ],
                "responses": {**EMPTY_OK, "422": VALIDATION_ERROR},
            }
        },
    }
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": __version__},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file differs from what would be written")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not TARGET.is_file() or TARGET.read_text() != text:
            print(f"{TARGET} is stale; run: python scripts/cog_openapi_schema.py", file=sys.stderr)
            return 1
        return 0
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
