"""Schemathesis hooks for the fuzzing run: most generated chat requests name
the served model, so the fuzzer reaches media handling, prompt building and
the engine instead of stopping at "model not found"."""

import schemathesis

MODEL = "internvl-tiny"


@schemathesis.hook
def map_body(context, body):
    if isinstance(body, dict) and "model" in body and hash(repr(sorted(body))) % 8:
        body["model"] = MODEL
    return body


@schemathesis.hook
def map_path_parameters(context, path_parameters):
    if path_parameters and "model_id" in path_parameters and hash(repr(path_parameters)) % 2:
        path_parameters["model_id"] = MODEL
    return path_parameters
