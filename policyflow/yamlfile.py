"""Reading YAML as written: PyYAML's safe loader, minus the things it does silently, and config
values checked as written (`exact_value`: no conversion that changes a value's kind).

`YamlLoader` refuses a key given twice in one mapping (PyYAML keeps the last), YAML 1.1's octal
(`010` is 8) and base-60 (`1:30` is 90) numbers, and integers longer than Python converts
(a bare ValueError otherwise). Each refusal is a `yaml.YAMLError` with its line; callers name
the file (`config.read_yaml`).
"""

from __future__ import annotations

import math
import re
import sys
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic_core import PydanticCustomError


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what it would otherwise do silently: keep the last of a key
    given twice in one mapping (`DuplicateKeyError`, with both lines), read `010` as octal 8 or
    `1:30` as base-60 90, or fail with a bare ValueError on an integer of more digits than Python
    converts. Each refusal is a YAMLError with its line."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: keys given beside it override the merged ones, as intended
            key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:
                continue  # an unhashable key: SafeLoader reports it
            if first is not None:
                raise DuplicateKeyError(f"key {key!r} is given twice, on lines {first} and {line} (YAML would silently keep only the last); keep one")
            lines[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        _refuse_yaml11_number(node)
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            raise yaml.constructor.ConstructorError(None, None, f"an integer of {len(node.value)} digits is more than Python reads ({sys.get_int_max_str_digits()})", node.start_mark) from None

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        _refuse_yaml11_number(node)
        return super().construct_yaml_float(node)


def _refuse_yaml11_number(node: yaml.ScalarNode) -> None:
    """YAML 1.1 reads `010` as octal 8 and `1:30` as base-60 90: refused where that changes the number, not silently changed."""
    text = node.value.replace("_", "")
    if ":" in text:
        raise yaml.constructor.ConstructorError(None, None, f"{node.value} is a base-60 number in YAML 1.1 (1:30 is 90); write the number you mean, or quote it for text", node.start_mark)
    if re.fullmatch(r"[-+]?0[0-7]+", text) and int(text, 8) != int(text, 10):
        raise yaml.constructor.ConstructorError(None, None, f"{node.value} is octal in YAML 1.1 ({int(text, 8)}); write it without the leading zero", node.start_mark)


YamlLoader.add_constructor("tag:yaml.org,2002:int", YamlLoader.construct_yaml_int)
YamlLoader.add_constructor("tag:yaml.org,2002:float", YamlLoader.construct_yaml_float)


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping names the same key twice."""


def load_yaml(text: str) -> Any:
    """YAML text as Python data, with `YamlLoader`'s checks (every YAML file policyflow reads goes through here)."""
    return yaml.load(text, Loader=YamlLoader)  # a SafeLoader: plain data only


def exact_value(annotation: Any, value: Any, default: Any) -> Any:
    """`value` for a field typed `annotation`, or a PydanticCustomError where pydantic's lax mode would change its meaning.

    Refused: a bool in a number field (`agent.max_turns=true` is not 1), anything but true/false
    in a bool field (`run.progress=1`), a fractional number in an integer field, and an integral
    float too large to be exact (`1.0e+30`). Kept: int → float (`train.lr=1`), numeric text →
    number (YAML 1.1 reads `1e-4` as text, and `train.steps=1e3` is 1000), an integral float in
    an integer field (`train.steps=3.0` is 3), YAML lists for tuple fields (checked item by item).
    """
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return exact_value(args[0], value, default)
    if origin is tuple and isinstance(value, (list, tuple)):
        items = (args[0],) * len(value) if args[-1:] == (Ellipsis,) else args
        return [exact_value(a, v, default) for a, v in zip(items, value)] if len(items) == len(value) else value
    members = args if origin in (Union, UnionType) else (annotation,)
    kinds = [a for a in members if a in (bool, int, float)]
    if value is None or len(kinds) != 1:
        return value
    kind = kinds[0]
    example = f"e.g. {shown(default)}, the default" if isinstance(default, (int, float, tuple)) else "or null for none" if type(None) in members else "e.g. 1"
    if kind is bool:
        if not isinstance(value, bool):
            raise _refused(value, "it takes true or false")
        return value
    if isinstance(value, bool):
        raise _refused(value, f"it takes {'a whole number' if kind is int else 'a number'} ({example}), not true/false")
    if kind is not int or not isinstance(value, (float, str)):
        return value
    try:
        number = float(value)  # text such as `1e3` (YAML 1.1 reads it as text) is judged as the number it spells
    except ValueError:
        return value  # not a number: pydantic says so
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return value  # all digits: pydantic reads it exactly
    if not math.isfinite(number) or not number.is_integer():
        raise _refused(value, f"it takes a whole number ({example})")
    if abs(number) >= 2 ** sys.float_info.mant_dig:
        raise _refused(value, "it is too large to be exact as a floating-point number; write all its digits")
    return int(number)


def _refused(value: Any, why: str) -> PydanticCustomError:
    return PydanticCustomError("exact_type", "{why}", {"why": why, "shown": shown(value)})


def shown(value: Any) -> str:
    """A value as YAML spells it: true, null, 0.9, 'text', [0.9, 0.99]."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)
