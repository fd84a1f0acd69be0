"""`localmim plot` and `localmim runs list | show` on real runs, through the real CLI."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import localmim_cli as lm
from conftest import TINY_TOML, run_cli


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, photo_folder):
    root = tmp_path_factory.mktemp("runs")
    config = root / "tiny.toml"
    config.write_text(TINY_TOML)
    done = lm.pretrain(photo_folder, config=config, out=root / "localmim", quiet=True)
    # a second run to overlay: one decoder at the top, MAE-style, stopped after one of two epochs
    top = lm.pretrain(photo_folder, config=config, out=root / "top-only", quiet=True, train__epochs=1,
                      model__taps=[4], model__scales=[1.0])
    return root, done, top


def test_plot_overlays_runs_with_every_panel(two_runs, tmp_path):
    root, done, top = two_runs
    out = tmp_path / "compare.png"
    r = run_cli("plot", done, top, "--out", out)
    assert r.returncode == 0, r.stderr
    said = " ".join(r.stdout.split())
    for panel in ("loss,", "loss_scale0", "loss_scale3", "lr", "images_per_s"):
        assert panel in said
    assert "localmim, top-only" in said
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 600 and img.height > 400


def test_plot_of_one_run_goes_into_its_figures_and_survives_a_torn_line(two_runs):
    root, done, _ = two_runs
    metrics = done / "metrics.jsonl"
    whole = metrics.read_text()
    try:
        metrics.write_text(whole + '{"epoch": 9, "step": 99, "lo')   # a crash mid-write
        r = run_cli("plot", done)
        assert r.returncode == 0, r.stderr
        assert (done / "figures" / "curves.png").is_file()
    finally:
        metrics.write_text(whole)


def test_plot_names_a_folder_that_is_not_a_run(tmp_path):
    r = run_cli("plot", tmp_path)
    assert r.returncode == 2 and "no metrics.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_runs_list_and_show(two_runs):
    root, done, top = two_runs
    r = run_cli("runs", "list", root, "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["path"].rsplit("/", 1)[-1]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"localmim", "top-only"}
    last = [json.loads(x) for x in (done / "metrics.jsonl").read_text().splitlines()][-1]
    assert rows["localmim"]["status"] == "finished" and rows["localmim"]["epoch"] == 2
    assert rows["localmim"]["step"] == last["step"] and rows["localmim"]["last_loss"] == pytest.approx(last["loss"])
    assert rows["top-only"]["epochs"] == 1 and rows["top-only"]["kind"] == "pretrain"
    r = run_cli("runs", "show", done)
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "finished"
    r = run_cli("runs", "show", root)
    assert r.returncode == 2 and "not a localmim run directory" in r.stderr
