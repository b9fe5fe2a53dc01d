"""Reading YAML as written: PyYAML's safe loader, minus the things it does silently.

`YamlLoader` refuses a key given twice in one mapping (PyYAML keeps the last), YAML 1.1's octal
(`010` is 8) and base-60 (`1:30` is 90) numbers, and integers longer than Python converts
(a bare ValueError otherwise). Each refusal is a `yaml.YAMLError` with its line; callers name
the file (`config.read_yaml`).
"""

from __future__ import annotations

import re
import sys
from typing import Any

import yaml


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
