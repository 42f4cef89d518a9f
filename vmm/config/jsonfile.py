"""The `-config FILE` front end: a JSON document in the schema of spec.md -> Draft.

Strict: unknown keys, duplicate keys, wrong types and missing required keys are errors
naming the JSON path (`drive[1].path_on_host`); malformed JSON names line and column.
Relative paths inside the file are taken relative to the current directory, as the
command line's are (StratoVirt's behaviour).
"""

import json
from pathlib import Path

from . import ratelimit
from .draft import Draft, Item, Setting
from .errors import ConfigError
from .schema import DEVICE_LISTS, DEVICE_OBJECTS, SECTIONS, TOP_LEVEL, Key
from .values import check_text, kind_of, show

_TYPE_WORDS = {str: "a string", int: "a whole number", bool: "true or false"}
# Keys whose value is an object: read by their own parser (value, where) -> typed value.
_OBJECT_PARSERS = {"rate_limit": ratelimit.from_json, "rx_rate_limit": ratelimit.from_json,
                   "tx_rate_limit": ratelimit.from_json}


def read_config_file(path: str) -> Draft:
    document = _load(path)
    draft = Draft()
    if not isinstance(document, dict):
        raise ConfigError(path, f"the document is {kind_of(document)}",
                          f"a JSON object with the keys {', '.join(TOP_LEVEL)}")
    for key, value in document.items():
        if key in SECTIONS:
            fields = _object(value, key, SECTIONS[key])
            draft.scalars.update(fields)
        elif key in DEVICE_LISTS:
            kind, keys = DEVICE_LISTS[key]
            if not isinstance(value, list):
                raise ConfigError(key, f"is {kind_of(value)}", "a list of objects")
            for index, entry in enumerate(value):
                where = f"{key}[{index}]"
                draft.devices[kind].append(Item(kind, where, _object(entry, where, keys)))
        elif key in DEVICE_OBJECTS:
            kind, keys = DEVICE_OBJECTS[key]
            draft.devices[kind].append(Item(kind, key, _object(value, key, keys)))
        else:
            raise ConfigError(key, "unknown key", f"the keys are {', '.join(TOP_LEVEL)}")
    return draft


def _load(path: str):
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError("-config", f"cannot read {show(path)}: {error.strerror}",
                          "give an existing, readable JSON file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(path, f"byte {error.start} is not UTF-8",
                          "write the file in UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys,
                          parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: line {error.lineno}, column {error.colno}",
                          error.msg, "write valid JSON") from None
    except ValueError as error:  # e.g. an integer with too many digits
        raise ConfigError(path, str(error), "write valid JSON") from None
    except RecursionError:
        raise ConfigError(path, "nested too deeply", "write the schema of stratovirt --help") from None


def _unique_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(show(key), "appears twice in one JSON object",
                              "give each key once")
        seen[key] = value
    return seen


def _no_constant(word):
    raise ConfigError(word, "is not a JSON number", "give a whole number")


def _object(value, where: str, keys: tuple[Key, ...]) -> dict[str, Setting]:
    names = ", ".join(k.json for k in keys)
    if not isinstance(value, dict):
        raise ConfigError(where, f"is {kind_of(value)}", f"an object with the keys {names}")
    by_json = {k.json: k for k in keys}
    for key in value:
        if key not in by_json:
            raise ConfigError(f"{where}.{key}", "unknown key", f"the keys are {names}")
    fields = {}
    for key in keys:
        path = f"{where}.{key.json}"
        if key.json not in value:
            if key.required:
                required = ", ".join(k.json for k in keys if k.required)
                raise ConfigError(path, "missing", f"{where} requires {required}")
            continue
        if key.type is dict:
            fields[key.name] = Setting(_OBJECT_PARSERS[key.name](value[key.json], path), path)
        else:
            fields[key.name] = Setting(_typed(value[key.json], key.type, path), path)
    return fields


def _typed(value, expected: type, where: str):
    # bool is an int in Python: check it first so `true` is never a vCPU count.
    ok = isinstance(value, bool) if expected is bool else (
        isinstance(value, expected) and not isinstance(value, bool))
    if not ok:
        raise ConfigError(where, f"is {kind_of(value)}", f"{_TYPE_WORDS[expected]} is expected")
    if expected is str:
        check_text(value, where)
    return value
