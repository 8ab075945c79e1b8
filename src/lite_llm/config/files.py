"""The one reader of every YAML/JSON file the project takes from a user: model configs,
training configs, curricula and growth recipes.

Whatever is wrong with such a file — missing, not YAML/JSON, not a mapping, an unknown key,
a value of the wrong type — is one sentence that names the file and, where the parser knows
it, the line, so the user can go straight to it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

from ..errors import ConfigError

T = TypeVar("T")


def read_yaml(text: str, path: str | Path) -> Any:
    """``text`` (the contents of ``path``) parsed as YAML, or one sentence saying where it is not."""
    import yaml

    try:
        return yaml.load(text, Loader=_unique_keys_loader())  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as exc:
        raise ConfigError(f"{path} gives {exc.key!r} twice (lines {exc.first} and {exc.again}); keep one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "malformed"
        raise ConfigError(f"{path} is not valid YAML{where} ({problem}); fix the file and try again") from None


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, again: int) -> None:
        self.key, self.first, self.again = key, first, again


def _unique_keys_loader() -> type:
    """PyYAML's SafeLoader, refusing a key given twice in one mapping (it keeps the last one
    without a word: ``steps: 3`` then ``steps: 5`` trained 5 steps)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, (str, int, float, bool)):
                    continue
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def read_config_file(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping in ``path`` (``.json``, else YAML), or one sentence naming the file.  ``-`` is
    standard input, and an existing file that is not a regular one (``/dev/stdin``, a named pipe,
    ``<(...)``) is read as a stream rather than called missing."""
    stdin = str(path) == "-"
    path = Path(path)
    if path.is_dir():  # "does not exist" would send the user looking for a path that is there
        raise ConfigError(f"{what} {path} is a directory; give the path of the {what} file (YAML or JSON) instead")
    if not stdin and not path.exists():
        raise ConfigError(f"{what} {path} does not exist; check the path")
    try:
        text = sys.stdin.read() if stdin else path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text; save it as UTF-8") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}); fix the file and try again") from None
    else:
        data = read_yaml(text, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of keys to values, not a {type(data).__name__}")
    return data


def key_line(path: str | Path, key: str) -> int | None:
    """The 1-based line where ``key`` first appears as a mapping key in the YAML file ``path``."""
    import yaml

    try:
        root = yaml.compose(Path(path).read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return None
    todo = [root]
    while todo:
        node = todo.pop(0)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if getattr(k, "value", None) == key:
                    return k.start_mark.line + 1
                todo.append(v)
        elif isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)
    return None


def load_config_file(path: str | Path, what: str, parse: Callable[[dict[str, Any]], T], *, keys: Any = None) -> T:
    """``parse`` of the mapping in ``path``; with ``keys``, a key not among them is refused
    first, naming its line.  Any :class:`ConfigError` from ``parse`` is reworded to name the file."""
    data = read_config_file(path, what)
    if keys is not None:
        unknown = [k for k in data if k not in set(keys)]
        if unknown:
            line = key_line(path, unknown[0])
            where = f"{path}, line {line}" if line else str(path)
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} in the {what}; known keys are {', '.join(sorted(keys))}")
    try:
        return parse(data)
    except ConfigError as exc:
        message = str(exc)
        if str(path) in message:
            raise
        raise ConfigError(f"{path}: {message}") from None
