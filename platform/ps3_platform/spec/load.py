"""Load a job spec from YAML, keeping line numbers so every error points at the file.

Errors are collected, not raised one at a time: the user sees every problem in one run,
each as one `FILE:LINE:COL: field.path: message` line (the shape compilers and editors
understand), with a did-you-mean for misspelt keys.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from .models import JobSpec, Pipeline, TrainingJob

Position = tuple[int, int]  # 1-based line, column

#: Bounds a hostile file cannot pass: a spec is a few hundred values, a dozen levels deep.
MAX_DEPTH = 64
MAX_VALUES = 10_000  # after alias expansion: a 400-byte "billion laughs" stops here, at once


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a spec, anchored to a place in the file."""

    file: str
    line: int
    col: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}:{self.col}: {where}{self.message}"


class SpecError(Exception):
    """A spec that cannot be used; `issues` holds one entry per problem."""

    def __init__(self, issues: list[SpecIssue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


@dataclass
class LoadedSpec:
    """A validated job plus where each field came from (for later, pool-aware checks)."""

    job: JobSpec
    file: str
    positions: dict[tuple, Position]

    def issue(self, path: tuple, message: str) -> SpecIssue:
        line, col = locate(self.positions, path)
        return SpecIssue(self.file, line, col, dotted(path), message)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe composer with a nesting limit: its recursion would otherwise end in a
    RecursionError (a traceback) on a deeply nested file."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _compose(text: str, file: str) -> tuple[Any, dict[tuple, Position]]:
    """Parse YAML into plain data and a map from key path to the key's position."""
    try:
        node = yaml.compose(text, Loader=_BoundedLoader)
    except yaml.YAMLError as exc:
        # The context mark is where the unclosed construct started, which is where to look.
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise SpecError([SpecIssue(file, line, col, "", f"invalid YAML: {_problem(exc)}")]) from None
    if node is None:
        raise SpecError([SpecIssue(file, 1, 1, "", "the file is empty: expected a job spec")])
    positions: dict[tuple, Position] = {(): (node.start_mark.line + 1, node.start_mark.column + 1)}
    return _construct(node, file, (), positions), positions


def _problem(exc: yaml.YAMLError) -> str:
    return getattr(exc, "problem", None) or str(exc).splitlines()[0]


def _construct(node: yaml.Node, file: str, path: tuple, positions: dict[tuple, Position]) -> Any:
    """Plain data from a composed node, recording each key's position in `positions`.

    Aliases are expanded here, so this is where the size is bounded: every value counts
    against MAX_VALUES, and a "billion laughs" stops after that many, at once. PyYAML's own
    constructor shares aliased objects and would hand the bomb on to whatever walks it
    next (validation, `resolved`, a ConfigMap dump), which then runs for minutes.
    """
    scalars = yaml.SafeLoader("")  # resolves scalar nodes to Python values (ints, bools, ...)
    budget = [MAX_VALUES]

    def walk(n: yaml.Node, path: tuple) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            mark = n.start_mark
            raise SpecError([SpecIssue(file, mark.line + 1, mark.column + 1, dotted(path),
                                       f"the YAML expands to more than {MAX_VALUES} values (nested aliases?)")])
        if isinstance(n, yaml.MappingNode):
            out = {}
            for key_node, value_node in n.value:
                key = key_node.value
                if key in out:
                    mark = key_node.start_mark
                    raise SpecError([SpecIssue(file, mark.line + 1, mark.column + 1, dotted(path + (key,)), "duplicate key")])
                positions[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                out[key] = walk(value_node, path + (key,))
            return out
        if isinstance(n, yaml.SequenceNode):
            items = []
            for i, item in enumerate(n.value):
                positions[path + (i,)] = (item.start_mark.line + 1, item.start_mark.column + 1)
                items.append(walk(item, path + (i,)))
            return items
        return scalars.construct_object(n, deep=True)

    return walk(node, path)


def dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def locate(positions: dict[tuple, Position], path: tuple) -> Position:
    """Position of the deepest prefix of `path` that exists in the file."""
    for end in range(len(path), -1, -1):
        if path[:end] in positions:
            return positions[path[:end]]
    return (1, 1)


def apply_overrides(data: dict, overrides: list[str], positions: dict[tuple, Position]) -> None:
    """Apply `--set a.b.c=value` overrides (value parsed as YAML, like `helm --set`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError([SpecIssue("--set", 1, 1, key, f"expected KEY.PATH=VALUE, got {item!r}")])
        # a.b[0].c (as Helm and the error messages write it) or a.b.0.c
        parts: list[Any] = [int(p) if p.isdigit() else p for p in re.split(r"\.|\[(\d+)\]\.?", key) if p]
        target: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(target, list) and isinstance(part, int) and part < len(target):
                target = target[part]
                continue
            if not isinstance(target, dict):
                raise SpecError([SpecIssue("--set", 1, 1, key, f"{dotted(tuple(parts[: i + 1]))} is not a mapping")])
            target = target.setdefault(part, {})
        value = _override_value(key, raw)
        if isinstance(target, list) and isinstance(parts[-1], int) and parts[-1] < len(target):
            target[parts[-1]] = value
        elif isinstance(target, dict):
            target[parts[-1]] = value
        else:
            raise SpecError([SpecIssue("--set", 1, 1, key, "cannot set a field inside a scalar")])
        # A key that is new to the file has no position: errors point at its nearest parent there.


def _override_value(key: str, raw: str) -> Any:
    """A `--set` value parsed as YAML within the same bounds as a file (nesting, alias
    expansion): a command line is as hostile as a file. A new key has no position in the
    file, so positions are not kept; errors point into the value (`--set:1:COL`)."""
    if not raw:
        return ""
    try:
        node = yaml.compose(raw, Loader=_BoundedLoader)
    except yaml.YAMLError as exc:
        raise SpecError([SpecIssue("--set", 1, 1, key, f"value {raw!r} is not valid YAML: {_problem(exc)}")]) from None
    return None if node is None else _construct(node, "--set", (key,), {})


def _closest(model: type[BaseModel] | None, key: str) -> str | None:
    if model is None:
        return None
    names = [f.alias or n for n, f in model.model_fields.items()]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return close[0] if close else None


def _suggest(model: type[BaseModel] | None, key: str) -> str:
    if model is None:
        return ""
    if close := _closest(model, key):
        return f"; did you mean {close!r}?"
    names = [f.alias or n for n, f in model.model_fields.items()]
    return f"; expected one of: {', '.join(sorted(names))}"


def _model_at(root: type[BaseModel], path: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at `path` (for did-you-mean)."""
    model: Any = root
    for part in path:
        if isinstance(part, int):
            continue
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return None
        model = _unwrap(field.annotation)
        if model is None:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _unwrap(arg)
        if found is not None:
            return found
    return None


def _clean_loc(loc: tuple) -> tuple:
    # pydantic adds union-member tags and 'function-after[...]' parts to `loc`: drop them.
    return tuple(p for p in loc if isinstance(p, int) or not str(p).startswith(("function-", "tagged-union")))


def _issues_from(exc: ValidationError, root: type[BaseModel], file: str, positions) -> list[SpecIssue]:
    errors = exc.errors()
    # A misspelt required key shows up twice (unknown 'metdata', missing 'metadata'): keep the
    # did-you-mean line only, since it already says what to write.
    misspelt = {
        _clean_loc(e["loc"])[:-1] + (close,)
        for e in errors
        if e["type"] == "extra_forbidden"
        and (close := _closest(_model_at(root, _clean_loc(e["loc"])[:-1]), str(e["loc"][-1])))
    }
    issues = []
    for err in errors:
        path = _clean_loc(err["loc"])
        if err["type"] == "missing" and path in misspelt:
            continue
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = f"unknown field {path[-1]!r}" + _suggest(_model_at(root, path[:-1]), str(path[-1]))
        elif err["type"] == "missing":
            message = "required field is missing"
        elif "input" in err and err["type"].endswith("_type"):
            message = f"{message} (got {type(err['input']).__name__} {err['input']!r:.40})"
        line, col = locate(positions, path)
        issues.append(SpecIssue(file, line, col, dotted(path), message))
    return issues


def parse(data: Any, file: str, positions: dict[tuple, Position]) -> JobSpec:
    """Validate plain data as a TrainingJob or Pipeline, raising SpecError with all issues."""
    if not isinstance(data, dict):
        raise SpecError([SpecIssue(file, 1, 1, "", "expected a mapping with apiVersion, kind, metadata, spec")])
    kinds = {"TrainingJob": TrainingJob, "Pipeline": Pipeline}
    kind = data.get("kind")
    if kind not in kinds:
        line, col = locate(positions, ("kind",))
        close = difflib.get_close_matches(str(kind), list(kinds), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SpecError([SpecIssue(file, line, col, "kind", f"expected TrainingJob or Pipeline, got {kind!r}{hint}")])
    model = kinds[kind]
    try:
        return TypeAdapter(model).validate_python(data)
    except ValidationError as exc:
        raise SpecError(_issues_from(exc, model, file, positions)) from None


def load_text(text: str, file: str = "<spec>", overrides: list[str] | None = None) -> LoadedSpec:
    data, positions = _compose(text, file)
    if overrides:
        if not isinstance(data, dict):
            raise SpecError([SpecIssue(file, 1, 1, "", "expected a mapping at the top level")])
        apply_overrides(data, overrides, positions)
    return LoadedSpec(parse(data, file, positions), file, positions)


def load(path: str | Path, overrides: list[str] | None = None) -> LoadedSpec:
    """Read and validate a spec file (no pool checks: see `validate.check_against_pools`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SpecError([SpecIssue(str(path), 1, 1, "", f"cannot read spec: {exc.strerror}")]) from None
    return load_text(decode_spec(data, str(path)), str(path), overrides)


def decode_spec(data: bytes, file: str) -> str:
    """UTF-8 text of a spec file, or a SpecError at the first byte that is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SpecError([SpecIssue(file, line, col, "", f"not UTF-8: byte 0x{data[exc.start]:02x} "
                                                        "(save the spec as UTF-8)")]) from None


def resolved(job: JobSpec) -> dict:
    """The spec with every default filled in: what the ConfigMap and the workers see."""
    return job.model_dump(mode="json", by_alias=True)


def spec_hash(stage_dump: dict) -> str:
    """Hash of what changes the optimisation (task, model, data, train, params).

    Resources and elasticity are left out: a restart on another world size is the same run.
    """
    keys = ("task", "model", "data", "train", "params")
    hashed = {k: stage_dump.get(k) for k in keys}
    if isinstance(hashed["data"], dict):  # how long reads retry is operations, not optimisation
        hashed["data"] = {k: v for k, v in hashed["data"].items() if k != "readRetrySeconds"}
    blob = json.dumps(hashed, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
