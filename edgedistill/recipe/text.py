"""The recipe as text: reading the file, YAML without duplicate keys, ``--set`` overrides, and pydantic's errors
said in one line of plain words.

* a recipe file that is no recipe (missing, a folder, a model file, not UTF-8, not YAML, a key given twice, empty,
  not a mapping) and a malformed ``--set`` are one :class:`RecipeError` line each;
* :func:`describe` turns pydantic's first error into ``key.path: what was expected, got what``: no regular
  expression, no union branch, no type or class name, and a validator's sub-key never doubled.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from edgedistill.base.errors import RecipeError
from edgedistill.base.registry import did_you_mean

# ---------------------------------------------------------------- recipe text: files, YAML, --set

# Files people pass where a recipe belongs, and where a recipe names them instead.
_NOT_RECIPES = {
    ".onnx": "an ONNX model; a recipe names it as teacher.path (source: onnx), and 'edgedistill validate RECIPE --onnx FILE' checks one",
    ".ort": "an ONNX Runtime model; 'edgedistill validate RECIPE --onnx FILE' checks one",
    ".pt": "a PyTorch file; a recipe names a teacher's weights as teacher.path",
    ".pth": "a PyTorch file; a recipe names a teacher's weights as teacher.path",
    ".ckpt": "a checkpoint; a recipe names a teacher's weights as teacher.path",
    ".safetensors": "a weights file; a recipe names a teacher's weights as teacher.path",
    ".pt2": "a torch.export program; a recipe names it as teacher.path (source: export)",
    ".npz": "a NumPy archive; a recipe names it as data.root (source: npz)",
    ".npy": "a NumPy array, not a recipe",
}


def read_recipe_file(path: Path, start: str) -> dict[str, Any]:
    """The top-level mapping of a recipe file; every way a file can fail to be a recipe is one RecipeError line
    (``start``: the recipe to copy, named when the file is empty)."""
    if path.is_dir():
        raise RecipeError(f"{path}: is a folder, expected a YAML recipe file")
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in _NOT_RECIPES:
        raise RecipeError(f"{path}: not a YAML recipe (a {suffix} file is {_NOT_RECIPES[suffix]})")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        text = "\x00"
    if "\x00" in text:
        raise RecipeError(f"{path}: not a YAML recipe (not UTF-8 text)")
    try:
        raw = yaml_load(text)
    except _DuplicateKey as e:
        raise RecipeError(f"{path}: line {e.line}: key '{e.key}' is given twice (first on line {e.first}); give each key once") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if raw is None or raw == {}:
        raise RecipeError(f"{path}: the recipe is empty; start from {start}")
    if not isinstance(raw, dict):
        kind = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "a list"}.get(type(raw), type(raw).__name__)
        raise RecipeError(f"{path}: expected a mapping of sections at the top level, got {kind} ({raw!r:.60})")
    return raw


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"key {key!r} is given twice")
        self.key, self.line, self.first = key, line, first


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (no tag builds a Python object) that also refuses a key given twice in one
    mapping: plain YAML keeps the last one without a word, silently dropping the first."""


def _no_duplicate_keys(loader: _RecipeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1, seen[key])
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def yaml_load(text: str) -> Any:
    """Parse recipe YAML (a file, or a --set value) safely: see :class:`_RecipeLoader`."""
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader subclass)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """``a.b.c=value``: value parsed as YAML (so numbers, booleans and lists work).

    ``a.b.c=null`` (or an empty value) removes the key, so an optional section or key takes its default (no
    recipe key gives null a meaning of its own); a required one is then reported as missing.
    """
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {item!r}: expected key.path=value")
    parts = key.strip().split(".")
    if not all(p.strip() for p in parts):
        raise RecipeError(f"--set {item!r}: '{key.strip()}' has an empty part; expected key.path=value")
    try:
        parsed = yaml_load(value) if value.strip() else None
    except _DuplicateKey as e:
        raise RecipeError(f"--set {key}: key '{e.key}' is given twice in the value") from None
    except yaml.YAMLError:
        parsed = value
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            if parsed is None:
                return  # removing a key below a section that is not there: nothing to remove
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--set {key}: '{part}' is a value, not a section")
        node = child
    if parsed is None:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = parsed


# ---------------------------------------------------------------- pydantic errors as one line of plain words

# loc entries pydantic adds for union branches and schema steps: not recipe keys
_SCHEMA_STEP = re.compile(r"[\w-]+\[.*\]|constrained-\w+|float|int|str|bool|none|bytes")
_SECTION = "a section of keys (a mapping)"
_EXPECTED = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "a whole number",
    "float_parsing": "a number", "float_type": "a number", "finite_number": "a finite number",
    "bool_parsing": "true or false", "bool_type": "true or false",
    "string_type": "a string", "list_type": "a list", "tuple_type": "a list", "set_type": "a list",
    "dict_type": _SECTION, "model_type": _SECTION, "model_attributes_type": _SECTION, "path_type": "a file path",
}
_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of")


def describe(errors: list[dict[str, Any]], raw: Any, root: type[BaseModel]) -> str:
    """pydantic's first error (of validating ``raw`` into ``root``) as ``key.path: what was expected, got what``.

    The errors of every branch of a union at that key become one line listing each accepted form.
    """
    err = errors[0]
    keys = _keys(err)
    path = _dotted(keys) or "recipe"
    got = err.get("input")
    shown = "" if isinstance(got, dict) or err["type"] == "missing" else f", got {got!r}"
    kind, msg, ctx = err["type"], err["msg"], err.get("ctx", {})
    if kind == "extra_forbidden":
        fields = _fields(_model_at(root, keys[:-1]))
        return f"unknown key '{path}'{did_you_mean(keys[-1], fields)}; valid keys here: {', '.join(sorted(fields))}"
    if kind in ("value_error", "assertion_error"):
        return _with_subkey(keys, msg.removeprefix("Value error, ").removeprefix("Assertion failed, "), raw, root)
    if kind == "missing" and keys and keys[-1].isdigit():  # a fixed-length tuple given too few values
        n = 1 + max(int(_keys(e)[-1]) for e in errors if e["type"] == "missing" and _keys(e)[:-1] == keys[:-1])
        return f"{_dotted(keys[:-1])}: expected {n} values, got {got!r}"
    if kind == "missing":
        return f"{path}: missing (required)"
    branches = [e for e in errors if _keys(e) == keys]
    if len(branches) > 1:  # a union: say every form the key accepts
        forms = [f.replace("true or false", "true, false") for f in dict.fromkeys(_expected(e) for e in branches)]
        return f"{path}: expected {', '.join(forms[:-1])} or {forms[-1]}{shown}"
    if kind in _BOUNDS:
        return f"{path}: must be {msg.removeprefix('Input should be ')}{shown}"
    if kind == "too_long" and ctx.get("field_type") == "Tuple":
        return f"{path}: expected {ctx.get('max_length')} values{shown}"
    if kind in ("too_short", "too_long"):
        bound = f"at least {ctx.get('min_length')}" if kind == "too_short" else f"at most {ctx.get('max_length')}"
        return f"{path}: expected {bound} item(s){shown}"
    return f"{path}: expected {_expected(err)}{shown}"


def _expected(err: dict[str, Any]) -> str:
    if err["type"] == "literal_error":
        return str(err.get("ctx", {}).get("expected", "one of the listed values"))
    if err["type"] in _BOUNDS:
        return "a number " + err["msg"].removeprefix("Input should be ")
    if err["type"] in _EXPECTED:
        return _EXPECTED[err["type"]]
    msg = err["msg"].removeprefix("Input should be ")
    return msg[:1].lower() + msg[1:]


def _keys(err: dict[str, Any]) -> list[str]:
    """The recipe keys of an error's loc: union branch names and schema steps dropped (except as an unknown key)."""
    loc = list(err["loc"])
    return [str(p) for i, p in enumerate(loc) if isinstance(p, int) or not _SCHEMA_STEP.fullmatch(p)
            or (i == len(loc) - 1 and err["type"] == "extra_forbidden")]


def _dotted(keys: list[str]) -> str:
    """``['export', 'formats', '0']`` → ``export.formats[0]``."""
    out = ""
    for k in keys:
        out += f"[{k}]" if k.isdigit() else (f".{k}" if out else k)
    return out


def _with_subkey(keys: list[str], msg: str, raw: Any, root: type[BaseModel]) -> str:
    """A validator's message ``sub.key: text`` under the key path ``keys`` it was raised at.

    ``sub.key`` is appended only when it is a key there (a field of that section, a key the recipe gives there, or
    any key of a section that takes free keys, like ``distill.loss``), and not twice: a validator of
    ``export.formats`` that says ``formats: …`` gives ``export.formats: …``, not ``export.formats.formats: …``.
    """
    sub, colon, rest = msg.partition(": ")
    parts = sub.split(".")
    if colon and re.fullmatch(r"[A-Za-z_][\w.]*", sub):
        for n in range(min(len(keys), len(parts)), 0, -1):
            if keys[-n:] == parts[:n]:  # the validator repeats the tail of the path it runs at
                return f"{_dotted(keys + parts[n:])}: {rest}"
        model = _model_at(root, keys)
        given_there = raw
        for k in keys:
            given_there = given_there.get(k) if isinstance(given_there, dict) else None
        if model is not None and (parts[0] in _fields(model) or model.model_config.get("extra") == "allow"
                                  or (isinstance(given_there, dict) and parts[0] in given_there)):
            return f"{_dotted(keys + parts)}: {rest}"
    return f"{_dotted(keys)}: {msg}" if keys else msg


def _model_at(root: type[BaseModel], keys: list[str]) -> type[BaseModel] | None:
    """The section model at ``keys`` below ``root`` (None where the keys lead to a value)."""
    model: Any = root
    for k in keys:
        fields = {(f.alias or n): f for n, f in model.model_fields.items()}
        ann = fields[k].annotation if k in fields else None
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return None
    return model


def _fields(model: type[BaseModel] | None) -> list[str]:
    return [(f.alias or n) for n, f in model.model_fields.items()] if model is not None else []
