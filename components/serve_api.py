"""The model server's API as an OpenAPI 3.1 document (GET /openapi.json), for client generators and gateways.

The request's fields are the served model's own (its input profile); tests/test_serve.py checks real answers
against this document.
"""

from components import model

ROUTES = {"/ping": "GET", "/health": "GET", "/version": "GET", "/openapi.json": "GET", "/invocations": "POST"}


def field_schema(column: str, nullable: bool) -> dict:
    if column in model.NUMBER_FIELDS:
        schema = {"type": "number"}
    elif column == model.DATE:
        schema = {"type": "string", "format": "date"}
    else:
        schema = {"type": "string"}
    return {**schema, "type": [schema["type"], "null"]} if nullable else schema


def error(*codes: str) -> dict:
    return {"description": " or ".join(codes), "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}


def answer(schema: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def document(profile: dict | None) -> dict:
    profile = profile or {}
    features = profile.get("features", model.FEATURES)
    required = set(profile.get("required", features))
    listing = {"type": "object", "required": list(features), "additionalProperties": True,
               "description": "A listing as the model reads it; other fields are ignored and named in `warnings`.",
               "properties": {c: field_schema(c, c not in required) for c in features}}
    problem = {"type": "object", "required": ["row", "field", "problem"], "properties": {
        "row": {"type": "integer", "description": "0-based; -1 for the whole request"},
        "field": {"type": "string"}, "problem": {"type": "string"}}}
    not_ready = error("MODEL_NOT_READY (the model is loading or cannot be served; Retry-After)")
    ready = {"200": answer("Ready", "the model is loaded"), "503": not_ready}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Rental price model server", "version": "1",
                 "description": "MLflow's scoring protocol, with price ranges, flags and the input checks of the "
                                "model's training data."},
        "paths": {
            "/ping": {"get": {"summary": "Readiness: 503 while the model loads or every slot is computing",
                              "responses": {**ready, "503": error("MODEL_NOT_READY", "SATURATED")}}},
            "/health": {"get": {"summary": "Liveness", "responses": ready}},
            "/version": {"get": {"summary": "The model version served", "responses": {
                "200": answer("Version", "the version served"), "503": not_ready}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {
                "200": {"description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/invocations": {"post": {
                "summary": "Price listings",
                "parameters": [{"name": "flag", "in": "query", "required": False, "schema": {"type": "boolean"},
                                "description": "price rows outside what the model was trained on, and flag them"}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Request"}}}},
                "responses": {
                    "200": answer("Prices", "a price (and range) per row, in order"),
                    "400": error("BAD_REQUEST (the body, or rows that cannot be priced: see problems)"),
                    "408": error("REQUEST_TIMEOUT (the body was not sent in time)"),
                    "413": error("REQUEST_TOO_LARGE"),
                    "415": error("UNSUPPORTED_MEDIA_TYPE (send application/json, UTF-8 unless a charset is named)"),
                    "429": error("TOO_MANY_REQUESTS (Retry-After)"),
                    "503": not_ready,
                }}},
        },
        "components": {"schemas": {
            "Listing": listing,
            "Request": {"oneOf": [
                {"type": "object", "required": ["dataframe_split"], "properties": {"dataframe_split": {
                    "type": "object", "required": ["columns", "data"], "properties": {
                        "columns": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                        "data": {"type": "array", "minItems": 1, "items": {"type": "array"}},
                        "index": {"type": "array"}}}}},
                {"type": "object", "required": ["dataframe_records"], "properties": {"dataframe_records": {
                    "type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Listing"}}}},
            ]},
            "Prices": {"type": "object", "required": ["predictions"], "properties": {
                "predictions": {"type": "array", "items": {"type": "number"}},
                "price_ranges": {"type": "array", "items": {
                    "type": "object", "required": ["low", "high"],
                    "properties": {"low": {"type": "number"}, "high": {"type": "number"}}}},
                "coverage": {"type": "number", "description": "the share of prices the ranges are made to hold"},
                "flags": {"type": "array", "items": problem},
                "warnings": {"type": "array", "items": {"type": "string"}}}},
            "Ready": {"type": "object", "required": ["status", "version"],
                      "properties": {"status": {"const": "ready"}, "version": {"type": "string"}}},
            "Version": {"type": "object", "required": ["model_uri", "version", "served", "fast_path"], "properties": {
                "model_uri": {"type": "string"}, "version": {"type": "string"}, "served": {"type": "string"},
                "fast_path": {"type": "boolean", "description": "scored by the model compiled to arrays, verified "
                                                                "at load against the model itself"}}},
            "Error": {"type": "object", "required": ["error_code", "message"], "properties": {
                "error_code": {"type": "string"}, "message": {"type": "string"},
                "problems": {"type": "array", "items": problem}}},
        }},
    }
