"""Layered settings with provenance: every resolved value knows which layer set it.

Layers, lowest first (a later layer wins, leaf by leaf):

    default                 the schema's own defaults
    run:<settings.json>     a resumed run's own settings (only with --resume)
    preset:<name>           a named recipe (presets/*.toml)
    file:<path>             --config, a .toml or .json file nested like the schema
    env:<VAR>               LOCALMIM_<SECTION>__<FIELD>[__<SUB>...]; only names with "__" are settings
    flag:--<name>           a command-line option the user actually gave
    flag:--set              --set a.b.c=value (applied after the named flags)

Dicts merge deeply: a layer that sets `model.encoder.options.arch` keeps the other option keys.
One exception: a layer that switches a plugin (`model.encoder.name`, `model.target.name`) to
another plugin drops the options set below it, since those were written for the old plugin.

Text values (env, --set) are read as JSON when they parse (numbers, booleans, lists, null) and
as plain strings otherwise; a field typed str or Path always takes the raw text.

Validation happens once, on the merged tree: first the schema, then each plugin's options with
the plugin's own model. Every problem is reported together, each naming the dotted field, the
bad value and the layer it came from.

Hand-rolled rather than pydantic-settings: provenance per leaf, deep-merged plugin options and
errors attributed to layers are the point, and pydantic-settings offers none of the three.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from localmim_cli.engine import atomic
from localmim_cli.errors import SettingsError

DEFAULT = "default"
Key = tuple[str, ...]

# (where a plugin choice sits, registry group)
PLUGIN_CHOICES: tuple[tuple[Key, str], ...] = ((("model", "encoder"), "encoders"),
                                               (("model", "target"), "targets"))




@dataclass
class Layer:
    label: str
    values: dict[str, Any]   # nested like the schema


@dataclass
class Resolved:
    settings: BaseModel
    provenance: dict[str, str]                 # dotted leaf path -> layer label, every leaf
    layers: list[str] = field(default_factory=list)   # labels applied, lowest first
    plugin_options: dict[str, BaseModel] = field(default_factory=dict)  # "model.encoder.options" -> validated
    others_env: list[str] = field(default_factory=list)   # variables left to the other commands (see resolve)

    def to_dict(self) -> dict[str, Any]:
        """The resolved values, JSON-ready; fed back as --config they give the same settings."""
        return self.settings.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def provenance_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "sources": dict(self.provenance)}

    def as_rows(self, plugin_defaults: bool = False) -> list[tuple[str, Any, str]]:
        """(dotted path, JSON-ready value, layer label) for every leaf, in schema order.

        plugin_defaults: also list plugin options nobody set, with the value the plugin's model
        gives them, labelled "plugin default".
        """
        rows = [(".".join(k), v, self.provenance[".".join(k)]) for k, v in _leaves(self.to_dict())]
        if plugin_defaults:
            for prefix, options in self.plugin_options.items():
                given = {p for p, _, _ in rows if p.startswith(prefix + ".")}
                extra = [(f"{prefix}.{name}", value, "plugin default")
                         for name, value in options.model_dump(mode="json").items()
                         if f"{prefix}.{name}" not in given]
                rows = [row for row in rows if not (row[0] == prefix and row[1] == {} and extra)]
                at = max((i for i, row in enumerate(rows) if row[0].startswith(prefix)), default=len(rows) - 1)
                rows[at + 1:at + 1] = extra
        return rows

    def write(self, run_dir: Path | str) -> tuple[Path, Path]:
        """settings.json (values; usable as --config) and settings.provenance.json, atomically."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        values, sources = run_dir / "settings.json", run_dir / "settings.provenance.json"
        atomic.write_text(values, self.to_json())
        atomic.write_json(sources, self.provenance_dict())
        return values, sources


# ---------------------------------------------------------------------------------------------
# Reading the layers


def parse_value(text: str) -> Any:
    """JSON when it parses (5, 1e-4, true, null, [0.9, 0.95], {"a": 1}), else the text itself."""
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        return text


def read_config_file(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise SettingsError([f"{path}: unknown settings file type {path.suffix or '(none)'!r}; "
                             f"use a .toml or .json file"])
    if not path.is_file():
        raise SettingsError([f"{path}: no such settings file"])
    try:
        if suffix == ".toml":
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError([f"{path}: not valid {suffix[1:].upper()}: {exc}"]) from None
    if not isinstance(data, dict):
        raise SettingsError([f"{path}: the top level must be a table of settings, "
                             f"not a {type(data).__name__}"])
    return data


def nest(path: Key, value: Any) -> dict[str, Any]:
    """("a", "b") , 1 -> {"a": {"b": 1}}"""
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def split_dotted(dotted: str) -> Key | None:
    parts = tuple(p.strip() for p in dotted.strip().split("."))
    return parts if parts and all(parts) else None


def env_layers(environ: Mapping[str, str], schema: type[BaseModel] | None = None,
               prefix: str = "LOCALMIM_") -> tuple[list[Layer], list[str]]:
    """One layer per settings variable, sorted by name; (layers, problems)."""
    layers, problems = [], []
    for var in sorted(environ):
        if not var.upper().startswith(prefix.upper()):
            continue
        rest = var[len(prefix):]
        if "__" not in rest:
            continue  # LOCALMIM_HOME and friends: not settings
        path = tuple(part.lower() for part in rest.split("__"))
        if not all(path):
            problems.append(f"env:{var}: empty part in the name; write "
                            f"{prefix}SECTION__FIELD, e.g. {prefix}TRAIN__EPOCHS")
            continue
        layers.append(Layer(f"env:{var}", nest(path, _parse_for(schema, path, environ[var]))))
    return layers, problems


def set_layers(sets: list[str], schema: type[BaseModel] | None = None) -> tuple[list[Layer], list[str]]:
    layers, problems = [], []
    for expr in sets:
        key, eq, text = expr.partition("=")
        path = split_dotted(key)
        if not eq or path is None:
            problems.append(f"--set {expr!r}: expected a dotted setting, '=' and a value, "
                            f"e.g. --set train.epochs=10")
            continue
        layers.append(Layer("flag:--set", nest(path, _parse_for(schema, path, text))))
    return layers, problems


def flag_layers(flags: Mapping[str, Any], flag_names: Mapping[str, str] | None = None
                ) -> tuple[list[Layer], list[str]]:
    layers, problems = [], []
    for dotted, value in flags.items():
        path = split_dotted(dotted)
        if path is None:
            problems.append(f"flag for {dotted!r}: not a dotted setting name")
            continue
        name = (flag_names or {}).get(dotted) or default_flag_name(path)
        layers.append(Layer(f"flag:{name}", nest(path, value)))
    return layers, problems


def default_flag_name(path: Key) -> str:
    """train.batch_size -> --batch-size; model.encoder.name -> --encoder."""
    leaf = path[-2] if path[-1] == "name" and len(path) > 1 else path[-1]
    return "--" + leaf.replace("_", "-")


def _parse_for(schema: type[BaseModel] | None, path: Key, text: str) -> Any:
    if schema is not None and _is_text_field(schema, path):
        return None if text.strip() == "null" and _is_optional(schema, path) else text
    return parse_value(text)


# ---------------------------------------------------------------------------------------------
# Merging


def merge_layer(merged: dict[str, Any], provenance: dict[Key, str], values: dict[str, Any],
                label: str, prefix: Key = ()) -> None:
    """Merge `values` into `merged` in place, recording `label` for every leaf it sets."""
    for key, value in values.items():
        path = prefix + (str(key),)
        current = merged.get(key)
        if isinstance(value, dict) and value:
            if _plugin_switch(path, current, value):
                current["options"] = {}
                _drop_under(provenance, path + ("options",))
            if not isinstance(current, dict):
                merged[key] = current = {}
                _drop_under(provenance, path)
            merge_layer(current, provenance, value, label, path)
        elif isinstance(value, dict) and isinstance(current, dict) and current:
            continue  # an empty table adds nothing to a non-empty one
        else:
            merged[key] = copy.deepcopy(value)  # later layers merge into it; never into the caller's
            _drop_under(provenance, path)
            provenance[path] = label


def _plugin_switch(path: Key, current: Any, value: dict[str, Any]) -> bool:
    return (any(path == where for where, _ in PLUGIN_CHOICES) and isinstance(current, dict)
            and "name" in value and current.get("name") != value["name"]
            and isinstance(current.get("options"), dict))


def _drop_under(provenance: dict[Key, str], path: Key) -> None:
    for k in [k for k in provenance if k[:len(path)] == path]:
        del provenance[k]


# ---------------------------------------------------------------------------------------------
# Resolving


def resolve(schema: type[BaseModel], *, preset: dict[str, Any] | None = None, preset_name: str | None = None,
            base: tuple[str, dict[str, Any]] | None = None, config_file: Path | str | None = None, environ: Mapping[str, str] | None = None,
            flags: Mapping[str, Any] | None = None, sets: list[str] | None = None,
            env_prefix: str = "LOCALMIM_", flag_names: Mapping[str, str] | None = None,
            other_schemas: tuple[type[BaseModel], ...] = ()) -> Resolved:
    """Merge the layers over the schema's defaults, validate, and say where each value came from.

    environ: None reads os.environ. flags: dotted setting -> value, only the flags the user gave.
    flag_names: dotted setting -> how the flag is spelled, for labels (default: --<leaf>).
    base: (label, values) of a layer below the preset: a resumed run's own settings.
    other_schemas: the settings of the other commands. A variable that names none of this
    schema's settings but one of theirs is theirs (exported for a pretraining, it must not stop
    an evaluation): it is left out, and listed in `Resolved.others_env`.
    Raises SettingsError listing every problem.
    """
    layers: list[Layer] = []
    problems: list[str] = []
    if base is not None:
        layers.append(Layer(base[0], base[1]))
    if preset is not None:
        layers.append(Layer(f"preset:{preset_name or 'preset'}", preset))
    if config_file is not None:
        layers.append(Layer(f"file:{config_file}", read_config_file(config_file)))
        if _looks_like_preset(schema, layers[-1].values):
            raise SettingsError([f"{config_file}: this is a preset file ([preset] and [settings] tables); "
                                 f"pass it as --preset {config_file}"])
    env, bad_env = env_layers(os.environ if environ is None else environ, schema, env_prefix)
    others_env = [l.label.removeprefix("env:") for l in env if _names_elsewhere(schema, other_schemas, l.values)]
    env = [l for l in env if l.label.removeprefix("env:") not in others_env]
    for new, bad in ((env, bad_env), flag_layers(flags or {}, flag_names), set_layers(list(sets or []), schema)):
        layers += new
        problems += bad
    problems += renamed_problems(schema, layers[1:] if base is not None else layers)
    if problems:
        raise SettingsError(problems)

    merged = _defaults(schema)
    provenance: dict[Key, str] = {}
    rank: dict[str, int] = {DEFAULT: -1}
    for i, layer in enumerate(layers):
        rank.setdefault(layer.label, i)
        merge_layer(merged, provenance, layer.values, layer.label)

    explain = _Explainer(schema, merged, provenance, rank)
    settings = None
    try:
        settings = schema.model_validate(merged)
    except ValidationError as exc:
        problems += explain.validation(exc, (), schema)
    plugin_options = _validate_plugins(schema, merged, explain, problems)
    if problems or settings is None:
        raise SettingsError(problems)

    dotted = {".".join(k): v for k, v in provenance.items()}
    full = {".".join(k): dotted.get(".".join(k), DEFAULT) for k, _ in _leaves(settings.model_dump(mode="json"))}
    return Resolved(settings, full, [DEFAULT] + list(dict.fromkeys(l.label for l in layers)), plugin_options,
                    others_env)


def _names_elsewhere(schema: type[BaseModel], others: tuple[type[BaseModel], ...], values: dict[str, Any]) -> bool:
    """The one setting in `values` (an env layer) is not `schema`'s but is one of `others`'."""
    path = _leaves(values)[0][0]
    return not _names_setting(schema, path) and any(_names_setting(o, path) for o in others)


def _names_setting(schema: type[BaseModel], path: Key) -> bool:
    """`path` is a setting of `schema`, or lies under one that takes any keys (plugin options)."""
    model: type[BaseModel] | None = schema
    for part in path:
        if model is None:
            return True
        if part not in model.model_fields:
            return False
        model = _model_in(model.model_fields[part].annotation)
    return True


def renamed_problems(schema: type[BaseModel], layers: list[Layer]) -> list[str]:
    """One line per setting a layer gives by a name the schema has renamed (its RENAMED: old
    dotted name -> new), naming the new one; a resumed run's own settings are not checked."""
    renamed: dict[str, str] = getattr(schema, "RENAMED", {})
    lines = []
    for layer in layers:
        for path, _ in _leaves(layer.values):
            old = next((".".join(path[:i]) for i in range(1, len(path) + 1) if ".".join(path[:i]) in renamed), None)
            if old is not None:
                lines.append(f"{_fmt(path)} (from {layer.label}): renamed to {renamed[old]}, the name "
                             f"the other commands give it; write {renamed[old]}")
    return lines


def _defaults(schema: type[BaseModel]) -> dict[str, Any]:
    try:
        return schema().model_dump()
    except ValidationError:  # a schema with required fields: no default layer to merge over
        return {}


def _looks_like_preset(schema: type[BaseModel], values: dict[str, Any]) -> bool:
    return {"preset", "settings"} <= set(values) and "preset" not in schema.model_fields


def _validate_plugins(schema: type[BaseModel], merged: dict[str, Any], explain: "_Explainer",
                      problems: list[str]) -> dict[str, BaseModel]:
    from localmim_cli.plugins import registry

    validated: dict[str, BaseModel] = {}
    for where, group in PLUGIN_CHOICES:
        if _submodel(schema, where) is None:
            continue  # e.g. a schema without plugin choices
        node = _get(merged, where)
        if not isinstance(node, dict):
            continue
        name, options = node.get("name"), node.get("options", {})
        if not isinstance(name, str) or not isinstance(options, dict):
            continue  # the schema step has reported it
        name_path = where + ("name",)
        try:
            plugin = registry.encoder(name) if group == "encoders" else registry.target(name)
        except registry.PluginError as exc:
            problems.append(f"{'.'.join(name_path)} = {name!r} (from {explain.label(name_path)}): {exc}")
            continue
        opt_path = where + ("options",)
        try:
            validated[".".join(opt_path)] = plugin.options.model_validate(options)
        except ValidationError as exc:
            problems += explain.validation(exc, opt_path, plugin.options)
        except Exception as exc:  # a plugin's validator may fail in any way; report, never crash
            problems.append(f"{'.'.join(opt_path)} = {options!r} (from {explain.label(opt_path)}): "
                            f"{group[:-1]} plugin {name!r} failed on its options: {type(exc).__name__}: {exc}")
    return validated


# ---------------------------------------------------------------------------------------------
# Explaining validation errors by layer


class _Explainer:
    def __init__(self, schema: type[BaseModel], merged: dict[str, Any], provenance: dict[Key, str],
                 rank: dict[str, int]):
        self.schema, self.merged, self.provenance, self.rank = schema, merged, provenance, rank

    def label(self, path: Key) -> str:
        for i in range(len(path), 0, -1):
            if path[:i] in self.provenance:
                return self.provenance[path[:i]]
        under = self._set_under(path)
        return self.provenance[under[0]] if under else DEFAULT

    def _set_under(self, path: Key, hint: str = "") -> list[Key]:
        """Paths set by some layer below `path`, the likeliest culprit of an error first."""
        under = [k for k in self.provenance if k[:len(path)] == path]
        named = [k for k in under if re.search(rf"\b{re.escape(k[-1])}\b", hint)]
        return sorted(named or under, key=lambda k: (self.rank.get(self.provenance[k], 0), len(k)), reverse=True)

    def validation(self, exc: ValidationError, prefix: Key, model: type[BaseModel]) -> list[str]:
        lines = []
        for err in exc.errors(include_url=False):
            loc = prefix + tuple(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            if err["type"] == "extra_forbidden":
                lines.append(f"{_fmt(loc)} = {err['input']!r} (from {self.label(loc)}): unknown setting"
                             f"{self._suggest(loc, prefix, model)}")
            elif err["type"] == "missing":
                lines.append(f"{_fmt(loc)}: required but not set (in {_fmt(loc[:-1]) or 'the settings'} "
                             f"from {self.label(loc[:-1])})")
            elif any(loc[:i] in self.provenance for i in range(len(loc), 0, -1)):
                lines.append(f"{_fmt(loc)} = {err['input']!r} (from {self.label(loc)}): {msg}")
            else:
                # A model-level check: blame what some layer set under it, names in the message first.
                culprits = self._set_under(loc, msg)
                if not culprits:
                    lines.append(f"{_fmt(loc) or 'settings'}: {msg} (from {DEFAULT})")
                    continue
                first, others = culprits[0], culprits[1:3]
                also = "".join(f"; with {_fmt(k)} = {_get(self.merged, k)!r} (from {self.provenance[k]})"
                               for k in others)
                lines.append(f"{_fmt(first)} = {_get(self.merged, first)!r} (from {self.provenance[first]}): "
                             f"{msg}{also}")
        return lines

    def _suggest(self, loc: Key, prefix: Key, model: type[BaseModel]) -> str:
        parent, bad = loc[:-1], loc[-1]
        here = _submodel(model, parent[len(prefix):]) if parent[:len(prefix)] == prefix else None
        siblings = list(here.model_fields) if here is not None else []
        close = difflib.get_close_matches(bad, siblings, n=1, cutoff=0.6)
        if close:
            return f"; did you mean {_fmt(parent + (close[0],))!r}?"
        # The right name in the wrong section (`epochs` at the top instead of `train.epochs`)?
        everywhere = [prefix + p for p in _schema_paths(model)]
        same_leaf = [p for p in everywhere if p[-1] == bad]
        if same_leaf:
            return f"; did you mean {_fmt(same_leaf[0])!r}?"
        close = difflib.get_close_matches(_fmt(loc), [_fmt(p) for p in everywhere], n=1, cutoff=0.6)
        if close:
            return f"; did you mean {close[0]!r}?"
        if siblings:
            return f"; valid names{' in ' + _fmt(parent) if parent else ''}: {', '.join(siblings)}"
        return ""


def _fmt(path: Key) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if part.isdigit() and out else (f".{part}" if out else part)
    return out


# ---------------------------------------------------------------------------------------------
# Schema and tree helpers


def _leaves(tree: Any, prefix: Key = ()) -> list[tuple[Key, Any]]:
    """Leaves of a nested dict; lists and empty dicts are leaves."""
    if isinstance(tree, dict) and tree:
        out = []
        for k, v in tree.items():
            out += _leaves(v, prefix + (str(k),))
        return out
    return [(prefix, tree)]


def _get(tree: Any, path: Key) -> Any:
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _unwrap(annotation: Any) -> list[Any]:
    """The alternatives of an annotation: X | None -> [X, NoneType]."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in _unwrap(arg)]
    return [annotation]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    for alt in _unwrap(annotation):
        if isinstance(alt, type) and issubclass(alt, BaseModel):
            return alt
    return None


def _submodel(model: type[BaseModel] | None, path: Key) -> type[BaseModel] | None:
    for part in path:
        if model is None or part not in model.model_fields:
            return None
        model = _model_in(model.model_fields[part].annotation)
    return model


def _field_annotation(schema: type[BaseModel], path: Key) -> Any:
    parent = _submodel(schema, path[:-1])
    if parent is None or path[-1] not in parent.model_fields:
        return None
    return parent.model_fields[path[-1]].annotation


def _is_text_field(schema: type[BaseModel], path: Key) -> bool:
    alts = [a for a in _unwrap(_field_annotation(schema, path)) if a is not type(None)]
    return bool(alts) and all(isinstance(a, type) and issubclass(a, (str, os.PathLike)) for a in alts)


def _is_optional(schema: type[BaseModel], path: Key) -> bool:
    return type(None) in _unwrap(_field_annotation(schema, path))


def _schema_paths(model: type[BaseModel], prefix: Key = ()) -> list[Key]:
    out = []
    for name, info in model.model_fields.items():
        out.append(prefix + (name,))
        sub = _model_in(info.annotation)
        if sub is not None:
            out += _schema_paths(sub, prefix + (name,))
    return out
