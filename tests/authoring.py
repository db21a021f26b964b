"""The authoring check: what protects you while you write a skill, run where you work, like a linter.

bot.py checks at start only what a running bot needs (paths and actions in step, parameters it can read, a schema
that compiles). This adds what only helps while you write: an annotation that disagrees with the declared type,
a schema keyword or format the validator would not enforce, `multipleOf` <= 0, keywords beside a `$ref` (ignored),
a default that breaks its own schema, a key given twice, an x-action-timeout-seconds where bot.py never reads it, and
OpenAPI's own structural rules. With FORWARD_URL set, a path without an action is forwarded: it has no function to
check, and the rest is checked all the same. `python -m pytest` runs it on your tools.yaml and ACTIONS
(tests/test_authoring.py); `python -m tests.simulate` runs it before it simulates. Each problem is one line: the file,
the function or parameter, and the fix.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import re
import types
import typing
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

import fastjsonschema
import yaml
from dotenv import dotenv_values
from openapi_spec_validator import validate as validate_openapi

import bot
from bot import ConfigError

# Schema keywords fastjsonschema enforces, and those that only describe; formats likewise (int32/int64: bounds).
CHECKED = {"type", "enum", "const", "format", "nullable", "default", "required", "properties", "additionalProperties"}
CHECKED |= {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength"}
CHECKED |= {"pattern", "items", "minItems", "maxItems", "uniqueItems", "minProperties", "maxProperties"}
CHECKED |= {"allOf", "anyOf", "oneOf", "not"}
DESCRIPTIVE = {"title", "description", "example", "deprecated", "readOnly", "writeOnly", "externalDocs"}
FORMATS = {*fastjsonschema.draft07.CodeGeneratorDraft07.FORMAT_REGEXS, "regex", "float", "double", "password"}
FORMATS |= {"int32", "int64"}  # enforced as bounds


Action = Callable[..., Any]
TIME_LIMIT = "x-action-timeout-seconds"  # an operation's own time limit, read by bot.py


class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key given twice is an error: a second `paths:` pasted in would replace the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        for key, (key_node, _) in zip(keys, node.value, strict=True):
            if keys.count(key) > 1:
                problem = f"{key!r} appears twice in one mapping"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def setting(name: str, env: Mapping[str, str] = os.environ, folder: Path = bot.TOOLS_FILE.parent) -> Any:
    """The setting `name` (say "forward_url") as bot.py in `folder` would start with it: from its environment variable,
    else from the .env beside bot.py (or above it); checked by bot.py's own rules (ConfigError), its default if unset.
    Only that one is read: the credentials need not be set to write or try a skill."""
    key = name.upper()
    if key in env:  # set, even empty: .env does not override it
        text = env[key]
    else:
        found = next((where / ".env" for where in (folder, *folder.parents) if (where / ".env").is_file()), None)
        try:
            text = (dotenv_values(found).get(key) or "") if found else ""
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{found} is not UTF-8 ({exc.reason}): save it as UTF-8") from None
    return getattr(bot.load_settings({"CLIENT_ID": "-", "CLIENT_SECRET": "-", key: text}), name)


def forwarding() -> bool:
    """Whether bot.py here forwards the operations that have no action (FORWARD_URL is set)."""
    return setting("forward_url") is not None


def check_file(
    path: Path = bot.TOOLS_FILE, actions: Mapping[str, Action] | None = None, forwarding: bool = False
) -> dict[str, Any]:
    """The operations of the tools file at `path` for `actions` (default bot.ACTIONS), as bot.py reads them (with
    `forwarding`, as it does when FORWARD_URL is set), after every authoring rule: ConfigError, one line, for the
    first one broken."""
    actions = bot.ACTIONS if actions is None else actions
    try:
        spec = yaml.load(path.read_text(encoding="utf-8"), UniqueKeyLoader)
    except yaml.constructor.ConstructorError as exc:
        raise ConfigError(f"{path.name} is not valid YAML: {' '.join(str(exc).split())}") from None
    except (OSError, yaml.YAMLError, UnicodeDecodeError, RecursionError):
        return bot.load_operations(path, actions, forwarding=forwarding)  # it says what is wrong, as it would at start
    operations = check_spec(spec, actions, path.name, path, forwarding)
    try:
        validate_openapi(spec)
    except Exception as exc:  # openapi-spec-validator's errors carry the whole schema: its first line is enough
        raise ConfigError(f"{path.name} is not valid OpenAPI 3.0: {str(exc).splitlines()[0]}") from None
    return operations


def check_spec(
    spec: Any,
    actions: Mapping[str, Action],
    name: str = "tools.yaml",
    path: Path | None = None,
    forwarding: bool = False,
) -> dict[str, Any]:
    """The schema rules, the operations as bot.load_operations reads them, then the rules of defaults and signatures
    (not OpenAPI's structural ones); a forwarded operation has no signature to check."""
    try:
        check_paths(spec, actions, name)
        check_structure(spec, name)
        check_schemas(spec, name)
    except ConfigError:
        raise
    except Exception:  # a tools.yaml bot.py cannot read: it says why, below
        pass
    operations = bot.load_operations(spec if path is None else path, actions, forwarding=forwarding)
    for operation in operations.values():
        where = f"{name}: {operation.method} {operation.path}"
        for parameter, schema in operation.schema["properties"].items():
            check_defaults(schema, f"{where}: parameter {parameter}")
        if operation.action is not None:  # else forwarded: the service takes what it takes
            check_signature(operation.action, operation.schema["properties"], where)
    return operations


def check_paths(spec: dict, actions: Mapping[str, Action], name: str) -> None:
    """A path in tools.yaml and one in ACTIONS spelled two ways, or a path pasted outside `paths:`, said as such."""
    in_tools, in_actions = spec["paths"].keys() - actions.keys(), actions.keys() - spec["paths"].keys()
    for route in sorted(in_tools):
        if twin := difflib.get_close_matches(route, list(in_actions), n=1, cutoff=0.8):
            raise ConfigError(f"{name} declares {route} and ACTIONS in bot.py has {twin[0]}: make them one path")
    for route in sorted(in_actions):
        under = [other for other, item in spec["paths"].items() if isinstance(item, dict) and route in item]
        if route in spec:
            where = "it is at the top level: indent it two spaces, under paths:"
        elif under:
            where = f"it is indented under {under[0]}: indent it as much as the other paths"
        else:
            continue
        raise ConfigError(f"ACTIONS in bot.py has {route}, but {name} does not declare it ({where})")


def check_structure(spec: dict, name: str) -> None:
    """OpenAPI's structure where bot.py reads it, in tools.yaml's terms."""
    for route, item in spec["paths"].items():
        if isinstance(item, dict) and TIME_LIMIT in item:  # bot.py reads it from an operation only
            raise ConfigError(
                f"{name}: {route}: {TIME_LIMIT} goes under get: or post:, beside x-dingtalk-display-result"
            )
        for method, op in item.items():
            if method in ("parameters", "summary", "description", "servers") or str(method).startswith(("x-", "/")):
                continue  # (a path indented under another: check_paths says where it is)
            if method not in ("get", "post"):
                raise ConfigError(f"{name}: {route}: {method!r} is not an operation DingTalk calls (get or post)")
            where = f"{name}: {method.upper()} {route}"
            if not isinstance(op, dict):
                raise ConfigError(f"{where} is not a mapping")
            body = op.get("requestBody")
            if body is not None and not isinstance(((body or {}).get("content") or {}).get("application/json"), dict):
                raise ConfigError(f"{where}: requestBody needs content: application/json: schema")
            names = []
            for entries in (item.get("parameters"), op.get("parameters")):
                if entries is not None and not isinstance(entries, list):
                    raise ConfigError(f"{where}: parameters must be a list")
                for entry in entries or []:
                    entry = resolve(spec, entry, where)
                    if entry.get("in") not in ("query", "path") or not isinstance(entry.get("name"), str):
                        raise ConfigError(f"{where}: only query and path parameters (in: query or path, with a name)")
                    segment = f"{{{entry['name']}}}"
                    if (entry["in"] == "path") != (segment in route):
                        problem = f"parameter {entry['name']} is in: path exactly when the path has {segment}"
                        raise ConfigError(f"{where}: {problem}")
                    names.append(entry["name"])
            for segment in re.findall(r"{([^}/]+)}", route):
                if segment not in names:
                    raise ConfigError(f"{where}: the path's {{{segment}}} needs a parameter with in: path")


def check_schemas(spec: dict, name: str) -> None:
    for route, item in spec["paths"].items():
        for method, op in item.items():
            if method not in ("get", "post"):
                continue
            where = f"{name}: {method.upper()} {route}"
            for entry in [*(item.get("parameters") or []), *(op.get("parameters") or [])]:
                entry = resolve(spec, entry, where)
                check_schema(spec, entry.get("schema") or {}, f"{where}: parameter {entry['name']}")
            if op.get("requestBody") is not None:
                body = resolve(spec, op["requestBody"]["content"]["application/json"]["schema"], where)
                for prop, schema in (body.get("properties") or {}).items():
                    check_schema(spec, schema, f"{where}: parameter {prop}")
                check_schema(spec, body, f"{where}: the body")


def resolve(spec: dict, node: Any, where: str) -> Any:
    """Follow local $refs ("#/components/schemas/X"); where one goes wrong, bot.py says so."""
    for _ in range(32):
        if not (isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/")):
            return node
        node = functools.reduce(
            lambda n, key: n.get(key) if isinstance(n, dict) else None, node["$ref"][2:].split("/"), spec
        )
    return node


def check_schema(spec: dict, node: Any, where: str, depth: int = 0) -> None:
    """Every keyword of an OpenAPI schema (its $refs followed) is one the validator enforces or one that only
    describes; a default keeps its own schema."""
    if depth > 32 or not isinstance(node, dict):
        return  # bot.py says so
    if "$ref" in node and (beside := sorted(set(node) - {"$ref", *DESCRIPTIVE})):
        raise ConfigError(
            f"{where}: {', '.join(beside)} beside a $ref is ignored: move it into {node['$ref']} (OpenAPI 3.0)"
        )
    schema = resolve(spec, node, where)
    for key, value in schema.items():
        if key in ("items", "not", "additionalProperties"):
            check_schema(spec, value, where, depth + 1)
        elif key in ("allOf", "anyOf", "oneOf") and isinstance(value, list):
            for item in value:
                check_schema(spec, item, where, depth + 1)
        elif key == "properties" and isinstance(value, dict):
            for name, item in value.items():
                check_schema(spec, item, f"{where}.{name}", depth + 1)
        elif key == "format" and not (isinstance(value, str) and value in FORMATS):
            raise ConfigError(f"{where}: format {value!r} is not one the bot can check; use pattern instead")
        elif key == "multipleOf" and isinstance(value, int | float) and value <= 0:
            raise ConfigError(f"{where}: multipleOf must be greater than 0, not {value!r}")
        elif key not in CHECKED and key not in DESCRIPTIVE and not str(key).startswith("x-"):
            raise ConfigError(f"{where}: {key!r} is not a schema keyword the bot can check")


def check_defaults(schema: Any, where: str) -> None:
    """Each default in a parameter's schema (as bot.py enforces it) keeps that schema: the bot fills it in unchecked."""
    if not isinstance(schema, dict):
        return
    rest = {key: value for key, value in schema.items() if key != "default"}
    if "default" in schema and (rule := broken_rule(rest, schema["default"])):
        raise ConfigError(f"{where}: its default {schema['default']!r} breaks its own schema: {rule}")
    for key, value in schema.items():
        if key in ("items", "not", "additionalProperties"):
            check_defaults(value, where)
        elif key in ("allOf", "anyOf", "oneOf") and isinstance(value, list):
            for item in value:
                check_defaults(item, where)
        elif key == "properties" and isinstance(value, dict):
            for name, item in value.items():
                check_defaults(item, f"{where}.{name}")


def broken_rule(schema: dict[str, Any], value: Any) -> str | None:
    """The rule of `schema` that `value` breaks, if it compiles and one does (the default is filled in unchecked)."""
    try:
        fastjsonschema.validate(schema, value)
    except fastjsonschema.JsonSchemaValueException as exc:
        return exc.message.removeprefix("data ")
    except Exception:  # a schema that does not compile: bot.py says so, naming the parameter
        return None
    return None


def check_signature(action: Action, props: dict[str, Any], where: str) -> None:
    """The bot passes parameters by name, and a plain annotation agrees with the declared type."""
    signature = inspect.signature(action)
    for param in signature.parameters.values():
        if param.kind is param.POSITIONAL_ONLY:
            raise ConfigError(f"{described(action)} takes {param.name!r} by position (before /): the bot passes names")
        if param.name not in props:
            continue
        types = props[param.name].get("type")
        declared = next((kind for kind in (types if isinstance(types, list) else [types]) if kind != "null"), None)
        allowed = json_types(annotation(action, param))
        if declared and allowed and declared not in allowed:
            expected = " or ".join(sorted(allowed))
            raise ConfigError(
                f"{described(action)} takes {param.name!r} as {expected}, but {where} declares {declared}"
            )


def described(action: Action) -> str:
    """`name() (file.py:12)`, pointing at the code, as bot.py names an action."""
    name, code = getattr(action, "__name__", type(action).__name__), getattr(inspect.unwrap(action), "__code__", None)
    return f"{name}() ({Path(code.co_filename).name}:{code.co_firstlineno})" if code else f"{name}()"


def annotation(action: Action, param: inspect.Parameter) -> Any:
    """A parameter's annotation, evaluated if it is text; None for one that does not evaluate (not ours to judge)."""
    if not isinstance(param.annotation, str):
        return param.annotation
    try:
        return eval(param.annotation, getattr(inspect.unwrap(action), "__globals__", {}))  # what get_type_hints does
    except Exception:
        return None


def json_types(hint: Any) -> set[str] | None:
    """The JSON types a plain annotation (str, int, float, bool, list, dict, Literal[...], X | None) takes."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if not isinstance(hint, Hashable):  # e.g. [int]: not an annotation we judge
        return None
    if origin is typing.Literal:
        return set().union(*(json_types(type(value)) or set() for value in args))
    if origin in (typing.Union, types.UnionType):
        parts = [json_types(arg) for arg in args if arg is not type(None)]
        return None if None in parts else set().union(*parts)
    plain = {str: {"string"}, bool: {"boolean"}, int: {"integer"}, float: {"number", "integer"}}
    return plain.get(hint) or {list: {"array"}, dict: {"object"}}.get(origin or hint)
