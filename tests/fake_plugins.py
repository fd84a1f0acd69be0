"""Fake installed plugins: a module file plus a `<dist>-<version>.dist-info/` folder (METADATA and
entry_points.txt) in a folder. On PYTHONPATH (the CLI in a subprocess) or on sys.path (in-process
registry tests), importlib.metadata finds its entry points as it finds an installed wheel's."""

from __future__ import annotations

from pathlib import Path


def install_fake(root: Path, dist: str, module: str, code: str, groups: dict[str, dict[str, str]],
                 version: str = "0.1") -> None:
    """Write `module`.py holding `code` into root, installed as distribution `dist` with
    `groups` = {entry point group: {entry name: attribute of the module}}."""
    (root / f"{module}.py").write_text(code)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = []
    for group, names in groups.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {module}:{attr}" for name, attr in names.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
