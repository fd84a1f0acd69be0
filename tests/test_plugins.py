"""Deliberately broken plugins, installed only for these tests, are reported by name and skipped;
the rest of the CLI keeps working.

Each fake plugin is installed into a temporary folder by tests/fake_plugins.py.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import cli_env, run_cli
from fake_plugins import install_fake
from localmim_cli.plugins import registry

HEADER = """
from pydantic import BaseModel, ConfigDict
import torch
from localmim_cli.plugins.api import EncoderPlugin, TargetPlugin
from localmim_cli.targets.base import ReconstructionTarget
from localmim_cli.targets.hog import plugin as hog


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
"""

# dist name -> (module name, module code, {group: {entry name: object}})
BROKEN = {
    "crashy-backbone": ("crashy_backbone", "import fancy_backbone_that_is_not_installed\n",
                        {"localmim.encoders": {"crashy": "plugin"}}),
    "future-backbone": ("future_backbone", HEADER + """
from localmim_cli.encoders.vit import plugin as vit
plugin = EncoderPlugin(name="future", api_version=2, options=vit.options, build=vit.build)
""", {"localmim.encoders": {"future": "plugin"}}),
    "wrong-object": ("wrong_object", "plugin = {'name': 'notaplugin'}\n",
                     {"localmim.targets": {"notaplugin": "plugin"}}),
    "twin-a": ("twin_a", HEADER + """
plugin = TargetPlugin(name="twin", api_version=1, options=hog.options, build=hog.build)
""", {"localmim.targets": {"twin": "plugin"}}),
    "twin-b": ("twin_b", HEADER + """
plugin = TargetPlugin(name="twin", api_version=1, options=hog.options, build=hog.build)
""", {"localmim.targets": {"twin": "plugin"}}),
    "vit-squatter": ("vit_squatter", HEADER + """
from localmim_cli.encoders.vit import plugin as vit
plugin = EncoderPlugin(name="vit", api_version=1, options=vit.options, build=vit.build)
""", {"localmim.encoders": {"vit": "plugin"}}),
    "badshape-target": ("badshape_target", HEADER + """
class BadShape(ReconstructionTarget):
    '''Says 5 values per cell, returns 4.'''
    def __init__(self, options, cells_px):
        super().__init__()
        self.cells_px, self.dims = list(cells_px), [5] * len(cells_px)

    def forward(self, images):
        b, _, h, w = images.shape
        return [torch.zeros(b, (h // c) * (w // c), 4) for c in self.cells_px]

plugin = TargetPlugin(name="badshape", api_version=1, options=NoOptions, build=BadShape)
""", {"localmim.targets": {"badshape": "plugin"}}),
}

EXPECTED_ERRORS = {  # name -> what `plugins list` must say about it
    "crashy": ["crashy-backbone", "broken", "failed to import crashy_backbone:plugin: ModuleNotFoundError",
               "fancy_backbone_that_is_not_installed"],
    "future": ["future-backbone", "broken", "written for encoder interface version 2; this localmim speaks "
               "version 1"],
    "notaplugin": ["wrong-object", "broken", "wrong_object:plugin is a dict, not a "
                   "localmim_cli.plugins.api.TargetPlugin"],
    "twin": ["twin-a", "twin-b", "broken", "name 'twin' is claimed by more than one plugin"],
}


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("broken_plugins")
    for dist, (module, code, groups) in BROKEN.items():
        install_fake(root, dist, module, code, groups)
    return root


@pytest.fixture
def on_path(monkeypatch):
    """Put folders of fake distributions on sys.path for in-process registry tests."""
    def add(root: Path) -> None:
        monkeypatch.syspath_prepend(str(root))
        importlib.invalidate_caches()
        registry.clear_cache()
    yield add
    monkeypatch.undo()
    importlib.invalidate_caches()
    registry.clear_cache()


def env_with(root: Path, **extra: str) -> dict[str, str]:
    # Wide: one table row per line, so a row can be read whole.
    return cli_env(PYTHONPATH=str(root), COLUMNS="1000", **extra)


def rows(stdout: str) -> dict[str, list[str]]:
    """`plugins list` table rows by plugin name (a name may have several rows)."""
    out: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if len(cells) == 5 and cells[1]:
            out.setdefault(cells[1], []).append(" ".join(cells))
    return out


# ------------------------------------------------------------------------------ through the CLI


def test_plugins_list_names_every_broken_plugin_and_its_error(broken_site):
    result = run_cli("plugins", "list", "--check", env=env_with(broken_site))
    assert result.returncode == 0, result.stderr
    table = rows(result.stdout)
    for name, expected in EXPECTED_ERRORS.items():
        text = " ".join(table[name])
        for piece in expected:
            assert piece in text, f"{name}: {piece!r} not in {text!r}"
    twins = table["twin"]
    assert len(twins) == 2 and all("broken" in row for row in twins)
    # The claim on a built-in name: localmim keeps 'vit', the newcomer is refused.
    vit_rows = table["vit"]
    assert len(vit_rows) == 2
    builtin = next(r for r in vit_rows if "localmim 0." in r)
    squatter = next(r for r in vit_rows if "vit-squatter" in r)
    assert " ok " in builtin + " "
    assert "broken" in squatter and "name 'vit' is already taken by localmim" in squatter
    # A wrong-shaped target cannot be told from its entry point alone; it loads, and fails at build.
    assert "ok" in " ".join(table["badshape"])
    # The healthy plugins are all there.
    for name in ("hog", "pixel"):
        assert " ok " in " ".join(table[name]) + " "


def test_built_in_plugins_still_work_with_broken_ones_installed(broken_site, tmp_path, tiny_config):
    result = run_cli("pretrain", "--config", tiny_config, "--dry-run", "--out", tmp_path / "run",
                     env=env_with(broken_site))
    assert result.returncode == 0, result.stderr
    assert "cells [2, 4, 8, 16] px" in " ".join(result.stdout.split())


def test_target_with_wrong_shape_is_named_at_build(broken_site, tmp_path, tiny_config):
    result = run_cli("pretrain", "--config", tiny_config, "--target", "badshape", "--dry-run",
                     "--out", tmp_path / "run", env=env_with(broken_site))
    assert result.returncode == 2, result.stdout + result.stderr
    message = " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert "error: target 'badshape' from badshape-target 0.1 returned wrong targets: scale 0 (2 px cells)" in message
    assert "expected shape (1, 256, 5) (batch, cells, dims[0]), got (1, 256, 4)" in message


def test_choosing_a_broken_plugin_is_a_one_line_error(broken_site, tmp_path, tiny_config):
    result = run_cli("pretrain", "--config", tiny_config, "--encoder", "crashy", "--dry-run",
                     "--out", tmp_path / "run", env=env_with(broken_site))
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert ("model.encoder.name = 'crashy' (from flag:--encoder): encoder 'crashy' from crashy-backbone 0.1 "
            "is broken: failed to import crashy_backbone:plugin: ModuleNotFoundError") in message


# ------------------------------------------------------------------------------ in-process


def test_registry_records_each_error(broken_site, on_path):
    on_path(broken_site)
    encoders = {(r.name, r.distribution): r for r in registry.discover("encoders")}
    targets = {(r.name, r.distribution): r for r in registry.discover("targets")}
    assert encoders[("vit", "localmim")].ok
    assert encoders[("vit", "vit-squatter")].error.startswith("name 'vit' is already taken by localmim "
                                                               "(localmim_cli.encoders.builtin:vit)")
    assert "interface version 2" in encoders[("future", "future-backbone")].error
    assert not targets[("twin", "twin-a")].ok and not targets[("twin", "twin-b")].ok
    assert "twin-a (twin_a:plugin), twin-b (twin_b:plugin)" in targets[("twin", "twin-a")].error
    assert registry.encoder("vit").options.__name__ == "ViTOptions"
    with pytest.raises(registry.PluginError, match="target 'twin' from twin-a 0.1 is broken: name 'twin' is "
                                                   "claimed by more than one plugin"):
        registry.target("twin")


def test_discovery_is_lazy(broken_site, on_path):
    """Asking for one plugin imports that one only: a broken neighbour is never imported."""
    on_path(broken_site)
    for module in ("crashy_backbone", "future_backbone", "twin_a"):
        sys.modules.pop(module, None)
    assert registry.encoder("vit").name == "vit"
    assert registry.target("hog").name == "hog"
    assert not {"crashy_backbone", "future_backbone", "twin_a", "twin_b"} & set(sys.modules)


FLAKY = HEADER + """
class Flaky(ReconstructionTarget):
    '''Right for one image, wrong for a batch (the build-time probe cannot see it).'''
    def __init__(self, options, cells_px):
        super().__init__()
        self.cells_px, self.dims = list(cells_px), [3] * len(cells_px)

    def forward(self, images):
        b, _, h, w = images.shape
        return [torch.zeros(b, (h // c) * (w // c), 3 if b == 1 else 2) for c in self.cells_px]

class Wrong(ReconstructionTarget):
    def __init__(self, options, cells_px):
        super().__init__()
        self.cells_px, self.dims = [99], [1]

def explode(options, cells_px):
    raise RuntimeError("CUDA kernel image not found")

flaky = TargetPlugin(name="flaky", api_version=1, options=NoOptions, build=Flaky)
wrong = TargetPlugin(name="wrong", api_version=1, options=NoOptions, build=Wrong)
explodes = TargetPlugin(name="explodes", api_version=1, options=NoOptions, build=explode)
"""


def test_targets_are_checked_at_build_and_on_every_call(tmp_path, on_path):
    install_fake(tmp_path, "odd-targets", "odd_targets", FLAKY,
                 {"localmim.targets": {"flaky": "flaky", "wrong": "wrong", "explodes": "explodes"}})
    on_path(tmp_path)
    flaky = registry.target("flaky")
    target = flaky.build(flaky.options(), [4, 8])  # the one-image probe passes
    with pytest.raises(registry.PluginError, match=re.escape(
            "target 'flaky' from odd-targets 0.1 returned wrong targets: scale 0 (4 px cells) of a 16x16 "
            "batch of 2: expected shape (2, 16, 3) (batch, cells, dims[0]), got (2, 16, 2)")):
        target(torch.zeros(2, 3, 16, 16))
    wrong = registry.target("wrong")
    with pytest.raises(registry.PluginError, match=re.escape(
            "target 'wrong' from odd-targets 0.1 built an unusable target: cells_px is [99], but it was "
            "built for [4, 8]; dims is [1]")):
        wrong.build(wrong.options(), [4, 8])
    explodes = registry.target("explodes")
    with pytest.raises(registry.PluginError, match=re.escape(
            "target 'explodes' from odd-targets 0.1 failed to build: RuntimeError: CUDA kernel image not found")):
        explodes.build(explodes.options(), [4, 8])


def test_encoder_build_is_checked(tmp_path, on_path):
    code = HEADER + """
from localmim_cli.encoders.vit import plugin as vit
def half_built(options, img_size, taps):
    encoder = vit.build(options, img_size, taps)
    encoder.taps = encoder.taps[:1]
    return encoder
plugin = EncoderPlugin(name="halfvit", api_version=1, options=vit.options, build=half_built)
"""
    install_fake(tmp_path, "half-vit", "half_vit", code, {"localmim.encoders": {"halfvit": "plugin"}})
    on_path(tmp_path)
    plugin = registry.encoder("halfvit")
    options = plugin.options(arch=None, embed_dim=32, depth=4, num_heads=2, patch_size=8)
    with pytest.raises(registry.PluginError, match=re.escape(
            "encoder 'halfvit' from half-vit 0.1 built an unusable encoder: tap_layers is [1, 2, 3, 4]: "
            "need one int per tap (1 taps)")):
        plugin.build(options, 32, [1, 2, 3, 4])
    # A setting the user can fix stays a plain ValueError with the plugin's own message.
    with pytest.raises(ValueError, match="not divisible by patch size"):
        plugin.build(options, 36, [1, 2, 3, 4])


def test_unknown_kind_and_name():
    with pytest.raises(registry.PluginError, match="no encoder named 'nope'; installed: .*vit"):
        registry.encoder("nope")
    with pytest.raises(ValueError, match="unknown plugin kind"):
        registry.get("decoders", "x")


# ------------------------------------------------------------------------------ the author's guide


def guide_files() -> dict[str, str]:
    """The files of docs/plugins.md's minimal plugin: code blocks whose first line names one."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    blocks = re.findall(r"```(?:python|toml)\n(.*?)```", doc, re.S)
    return {b.splitlines()[0][2:].strip(): b for b in blocks if b.startswith("# ")}


def test_guide_minimal_plugin_works_as_written(tmp_path, on_path):
    import tomllib

    files = guide_files()
    assert set(files) == {"pyproject.toml", "localmim_tiny/__init__.py", "tests/test_tiny.py"}
    project = tomllib.loads(files["pyproject.toml"])["project"]
    package = tmp_path / "localmim_tiny"
    package.mkdir()
    (package / "__init__.py").write_text(files["localmim_tiny/__init__.py"])
    info = tmp_path / f"localmim_tiny-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in eps.items())
        for group, eps in project["entry-points"].items()))
    on_path(tmp_path)
    sys.modules.pop("localmim_tiny", None)
    namespace: dict = {}
    exec(compile(files["tests/test_tiny.py"], "tests/test_tiny.py", "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert len(tests) == 3
    for test in tests:
        test()
    assert {r.name: r.distribution for r in registry.discover("encoders")}["tiny"] == "localmim-tiny"
