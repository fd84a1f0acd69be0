"""Finds encoders and targets through entry points, loading each lazily and in isolation.

Built-in plugins register through the same groups as third-party ones (see pyproject.toml).

Lazy: listing a group reads only package metadata; a plugin's module is imported the first time
that plugin is asked for by name (`localmim plugins list` imports every one, each in a child
process: plugins/probe.py). So a broken third-party plugin costs nothing, and breaks nothing, for
a run that does not use it.

Isolated: a plugin that fails to import, has the wrong type, was written for another interface
version, or claims a name another plugin already has is recorded with its error and skipped;
it never takes the program down. Name clashes: the built-in distribution (`localmim`) keeps its
names and the newcomer is refused; a clash between third parties refuses every claimant, since
picking one by installation order would make runs depend on it.

Plugins are also checked when they build: an exception other than ValueError (a setting the user
can fix) becomes a PluginError naming the plugin, the built object must be of the right class
and describe itself consistently, and a target's output is checked against its `dims` on every
call (shapes only: no host synchronisation).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

from localmim_cli.plugins.api import EncoderPlugin, TargetPlugin
from localmim_cli.errors import ModelError, PluginError

GROUPS = {"encoders": ("localmim.encoders", EncoderPlugin),
          "targets": ("localmim.targets", TargetPlugin)}

BUILTIN_DISTRIBUTION = "localmim"




def _normalize(dist_name: str) -> str:
    return re.sub(r"[-_.]+", "-", dist_name).lower()


@dataclass(eq=False)  # identity: one record per entry point (hashable, for the cache below)
class PluginRecord:
    kind: str                      # "encoders" or "targets"
    name: str
    value: str                     # "module:attr" the entry point names
    distribution: str
    version: str
    plugin: EncoderPlugin | TargetPlugin | None = None
    error: str | None = None
    entry_point: EntryPoint | None = field(default=None, repr=False, compare=False)
    loaded: bool = field(default=False, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.plugin is not None

    @property
    def builtin(self) -> bool:
        return _normalize(self.distribution) == BUILTIN_DISTRIBUTION

    @property
    def label(self) -> str:
        """How messages name the plugin: kind, name and where it comes from."""
        return f"{self.kind[:-1]} {self.name!r} from {self.distribution} {self.version}"

    def load(self) -> "PluginRecord":
        """Import the plugin once; errors are recorded on the record, never raised."""
        if self.loaded:
            return self
        self.loaded = True
        if self.error is None and self.entry_point is not None:
            self.plugin, self.error = _load(self.kind, self.entry_point)
        return self


def _load(kind: str, ep: EntryPoint) -> tuple[EncoderPlugin | TargetPlugin | None, str | None]:
    expected_type = GROUPS[kind][1]
    try:
        obj = ep.load()
    # A plugin's import may fail in any way; report it, never crash. (One that hangs or calls
    # os._exit cannot be survived in-process: `plugins list` imports in a child, plugins/probe.py.)
    except (Exception, SystemExit, KeyboardInterrupt) as exc:
        return None, f"failed to import {ep.value}: {type(exc).__name__}: {exc}"
    if not isinstance(obj, expected_type):
        return None, (f"{ep.value} is a {type(obj).__name__}, not a "
                      f"localmim_cli.plugins.api.{expected_type.__name__}")
    if obj.api_version != expected_type.expected_api_version:
        return None, (f"written for {kind[:-1]} interface version {obj.api_version!r}; this localmim speaks "
                      f"version {expected_type.expected_api_version} (install a release of the plugin "
                      f"made for version {expected_type.expected_api_version})")
    if obj.name != ep.name:
        return None, f"entry point is named {ep.name!r} but the plugin calls itself {obj.name!r}"
    if not (isinstance(obj.options, type) and hasattr(obj.options, "model_validate")):
        return None, f"{ep.value}.options is {obj.options!r}, not a pydantic model class"
    if not callable(obj.build):
        return None, f"{ep.value}.build is not callable"
    return obj, None


@functools.cache
def entries(kind: str) -> tuple[PluginRecord, ...]:
    """Every entry point of the group, not yet imported; name clashes already marked broken."""
    if kind not in GROUPS:
        raise ValueError(f"unknown plugin kind {kind!r}; one of {', '.join(GROUPS)}")
    records = []
    for ep in entry_points(group=GROUPS[kind][0]):
        dist = ep.dist
        records.append(PluginRecord(kind, ep.name, ep.value, dist.name if dist else "?",
                                    dist.version if dist else "?", entry_point=ep))
    by_name: dict[str, list[PluginRecord]] = {}
    for r in records:
        by_name.setdefault(r.name, []).append(r)
    for name, same in by_name.items():
        if len(same) < 2:
            continue
        builtin = [r for r in same if r.builtin]
        if len(builtin) == 1:
            owner = builtin[0]
            for r in same:
                if r is not owner:
                    r.error = (f"name {name!r} is already taken by {owner.distribution} ({owner.value}); "
                               f"this plugin ({r.value}) is skipped: rename its entry point")
        else:
            owners = ", ".join(f"{r.distribution} ({r.value})" for r in same)
            for r in same:
                r.error = (f"name {name!r} is claimed by more than one plugin: {owners}; all are skipped "
                           "until all but one are renamed or uninstalled")
    return tuple(records)


def discover(kind: str) -> tuple[PluginRecord, ...]:
    """Every entry point of the group, loaded (this imports every plugin: for listing them)."""
    return tuple(r.load() for r in entries(kind))


def get(kind: str, name: str) -> EncoderPlugin | TargetPlugin:
    """The plugin of that name, its build checked (see the module docstring); imports only it."""
    records = [r for r in entries(kind) if r.name == name]
    if not records:
        available = sorted({r.name for r in entries(kind)})
        raise PluginError(f"no {kind[:-1]} named {name!r}; installed: {', '.join(available) or 'none'} "
                          "(see `localmim plugins list`)")
    usable = [r for r in records if r.load().ok]
    if not usable:
        r = next((r for r in records if r.builtin), records[0])  # a built-in's own error comes first
        raise PluginError(f"{r.label} is broken: {r.error}")
    return _checked(usable[0])


def encoder(name: str) -> EncoderPlugin:
    return get("encoders", name)


def target(name: str) -> TargetPlugin:
    return get("targets", name)


def clear_cache() -> None:
    """Forget what was discovered (tests that install plugins while running)."""
    entries.cache_clear()
    _checked.cache_clear()


# ---------------------------------------------------------------------------------------------
# Checks at build time and on a target's every call


@functools.cache
def _checked(record: PluginRecord) -> EncoderPlugin | TargetPlugin:
    plugin = record.plugin
    guard = _encoder_build if record.kind == "encoders" else _target_build
    return dataclasses.replace(plugin, build=functools.partial(guard, record.label, plugin.build))


def _call_build(label: str, build, *args):
    try:
        return build(*args)
    except (ModelError, PluginError):
        raise
    except ValueError as exc:  # the plugin rule: a setting the user can fix (bad taps, sizes)
        raise ModelError(f"{label}: {exc}") from exc
    except Exception as exc:
        raise PluginError(f"{label} failed to build: {type(exc).__name__}: {exc}") from exc


def _encoder_build(label: str, build, options, img_size: int, tap_layers):
    from localmim_cli.plugins.checks import encoder_structure_problems

    encoder = _call_build(label, build, options, img_size, tap_layers)
    problems = encoder_structure_problems(encoder, img_size)
    if problems:
        raise PluginError(f"{label} built an unusable encoder: {'; '.join(problems)}")
    return encoder


def _target_build(label: str, build, options, cells_px: list[int]):
    import torch

    from localmim_cli.plugins.checks import probe_images, target_output_problems, target_structure_problems

    target = _call_build(label, build, options, list(cells_px))
    problems = target_structure_problems(target, cells_px)
    if problems:
        raise PluginError(f"{label} built an unusable target: {'; '.join(problems)}")
    # One small deterministic batch now, so `pretrain --dry-run` catches a target whose output
    # does not match its own `dims`; the image side is the smallest that holds two of the
    # largest cells and a whole number of every cell.
    side = math.lcm(*cells_px)
    side *= math.ceil(2 * max(cells_px) / side)
    images = probe_images(1, side)
    try:
        with torch.no_grad():
            output = target(images)
    except (ModelError, PluginError):
        raise
    except ValueError as exc:
        raise ModelError(f"{label}: {exc}") from exc
    except Exception as exc:
        raise PluginError(f"{label} failed on a {side}x{side} probe image: {type(exc).__name__}: {exc}") from exc
    problems = target_output_problems(target, images, output)
    if problems:
        raise PluginError(f"{label} returned wrong targets: {'; '.join(problems)}")
    target.register_forward_hook(functools.partial(_check_target_call, label))
    return target


def _check_target_call(label: str, module, args, output) -> None:
    from localmim_cli.plugins.checks import target_output_problems

    problems = target_output_problems(module, args[0], output)
    if problems:
        raise PluginError(f"{label} returned wrong targets: {'; '.join(problems)}")
