"""The speed settings of a training step (train.compile, precision, AdamW implementation,
activation checkpointing, FSDP, threads): each runs faster or leaner and computes the same."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import cli_env, run_cli
from localmim_cli.config.schema import ModelSettings, PretrainSettings
from localmim_cli.engine import checkpoints, distributed, optimizer as adamw
from localmim_cli.engine.activation_checkpointing import checkpoint_blocks, transformer_blocks
from localmim_cli.engine.compiling import Compilation, compiler_missing
from localmim_cli.engine.loop import resolve_precision
from localmim_cli.engine.threads import choose_intra_op_threads
from localmim_cli.engine.wrapping import check_fsdp
from localmim_cli.errors import UsageError
from localmim_cli.model.build import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

# The smallest LocalMIM: one block, one tap, pixel target; compiling it is what costs.
SMALLEST = {"img_size": 16, "taps": [1], "scales": [1.0], "target": {"name": "pixel"},
            "encoder": {"name": "vit", "options": {"arch": None, "patch_size": 8, "embed_dim": 16,
                                                   "depth": 1, "num_heads": 2}},
            "decoder": {"width": 16, "num_heads": 2}}


def loss_and_grads(model: torch.nn.Module, images, noise) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(images, noise=noise).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_auto_precision_is_fp32_on_cpus_and_an_explicit_choice_stands(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", cpu) == "fp32"
    for explicit in ("bf16", "fp16", "fp32"):
        assert resolve_precision(explicit, cpu) == explicit == resolve_precision(explicit, gpu)
    # On GPUs the choice follows native bf16 support (emulated bf16 does not count).
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                        asked.append(including_emulation) or native)
    native = True
    assert resolve_precision("auto", gpu) == "bf16"
    native = False
    assert resolve_precision("auto", gpu) == "fp16"
    assert asked == [False, False]


def test_adamw_is_multi_tensor_on_cpus_and_a_restored_state_keeps_this_machines_choice():
    model = torch.nn.Linear(4, 2)
    groups = [{"params": [model.weight], "weight_decay": 0.05}, {"params": [model.bias], "weight_decay": 0.0}]
    opt = adamw.adamw(groups, lr=1e-3, betas=(0.9, 0.95))
    assert adamw.implementation(opt.param_groups) == "foreach"
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:       # as saved on a machine that chose differently
        group["foreach"], group["fused"] = False, True
    adamw.load_state(opt, saved)
    assert [(g["foreach"], g["fused"]) for g in opt.param_groups] == [(True, None)] * 2
    assert torch.equal(opt.state[model.weight]["exp_avg"], saved["state"][0]["exp_avg"])


@pytest.mark.skipif(compiler_missing(torch.device("cpu")) is not None,
                    reason="no C++ compiler for torch.compile's CPU code")
def test_a_compiled_step_gives_the_eager_loss_and_gradients(monkeypatch):
    from torch._inductor import config

    monkeypatch.setattr(config, "compile_threads", 1)   # no pool of compile workers to start
    torch.manual_seed(0)
    eager = build_model(ModelSettings.model_validate(SMALLEST))
    compiled = copy.deepcopy(eager)
    said = []
    compilation = Compilation(compiled, "default", torch.device("cpu"), said.append)
    assert compilation.active and not said
    images, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 4)
    loss, grads = compilation.first_step(lambda: loss_and_grads(compiled, images, noise), undo=lambda: None)
    assert compilation.active and not said     # it compiled: no fallback
    assert compiled.state_dict().keys() == eager.state_dict().keys()   # checkpoints unchanged
    eager_loss, eager_grads = loss_and_grads(eager, images, noise)
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_missing_compiler_is_said_in_one_line_and_the_model_stays_eager(monkeypatch):
    from torch._inductor import config

    monkeypatch.setattr(config.cpp, "cxx", (None, "/nonexistent/c++"))
    model = build_model(ModelSettings.model_validate(SMALLEST))
    said = []
    compilation = Compilation(model, "max-autotune", torch.device("cpu"), said.append)
    assert not compilation.active and model._compiled_call_impl is None
    assert said == ["train.compile=max-autotune: cannot compile (no C++ compiler (/nonexistent/c++) found); "
                    "running eagerly"]


SMALLEST_TOML = """
[model]
img_size = 16
taps = [1]
scales = [1.0]
[model.target]
name = "pixel"
[model.encoder]
name = "vit"
options = { patch_size = 8, embed_dim = 16, depth = 1, num_heads = 2 }
[model.decoder]
width = 16
num_heads = 2
[data]
workers = 0
[optim]
warmup_epochs = 1
[train]
epochs = 1
batch_size = 2
log_every = 1
device = "cpu"
precision = "fp32"
"""


def test_compiling_that_fails_at_the_first_step_goes_on_eagerly(tmp_path):
    """A compiler that exists but fails (/bin/false): the first step's compilation fails for
    real, the run says so once and trains every step eagerly, with the eager losses."""
    config = tmp_path / "smallest.toml"
    config.write_text(SMALLEST_TOML)
    env = cli_env(CXX="/bin/false", TORCHINDUCTOR_FORCE_DISABLE_CACHES="1", TORCHINDUCTOR_COMPILE_THREADS="1")
    r = run_cli("pretrain", "--config", config, "--out", tmp_path / "run", "--set", "train.compile=true", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert out.count("train.compile=default: cannot compile (") == 1 and "running eagerly" in out
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["speed"]["compile"] == "default"   # as it was at the start: what was asked and built
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in records] == [1, 2, 3] and all(m["loss"] > 0 for m in records)


def test_the_failed_first_step_is_undone_before_it_runs_again_eagerly(monkeypatch):
    """What the failed compiled step left (its gradients) is cleared, so the eager rerun's
    gradients are the eager step's, not twice them."""
    monkeypatch.setattr("localmim_cli.engine.compiling.compiler_missing", lambda device: None)
    torch.manual_seed(0)
    model = build_model(ModelSettings.model_validate(SMALLEST))
    reference = copy.deepcopy(model)
    images, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 4)
    said, calls = [], []
    compilation = Compilation(model, "default", torch.device("cpu"), said.append)   # compiles lazily
    assert compilation.pending and not said
    model._compiled_call_impl = None     # the step below runs eagerly and "fails to compile" once

    def step():
        model(images, noise=noise).loss.backward()        # gradients land, then compiling "fails"
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("backend compiler failed\nsecond line")
        return "done"
    assert compilation.first_step(step, undo=lambda: model.zero_grad(set_to_none=True)) == "done"
    assert said == ["train.compile=default: cannot compile (RuntimeError: backend compiler failed); running eagerly"]
    assert not compilation.active and not compilation.pending
    _, expected = loss_and_grads(reference, images, noise)
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("encoder", [
    {"name": "vit", "options": {"arch": None, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2,
                                "drop_path": 0.3}},
    {"name": "swin", "options": {"arch": None, "patch_size": 4, "embed_dim": 8, "depths": [2, 2],
                                 "num_heads": [1, 2], "window_size": 2, "drop_path": 0.3}},
])
def test_activation_checkpointing_gives_the_same_losses_and_gradients(encoder):
    """Drop path is on: the recomputed blocks must replay the random state of the first pass."""
    taps = [1, 2] if encoder["name"] == "swin" else [1, 3]
    settings = ModelSettings.model_validate({"img_size": 32, "taps": taps, "scales": [1.0, 1.0],
                                             "encoder": encoder, "decoder": {"width": 16, "num_heads": 2}})
    torch.manual_seed(0)
    plain = build_model(settings)
    checkpointed = copy.deepcopy(plain)
    blocks = transformer_blocks(checkpointed.encoder)
    assert len(blocks) == (4 if encoder["name"] == "swin" else 3)
    checkpoint_blocks(blocks)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, plain.num_units)
    torch.manual_seed(1)
    loss, grads = loss_and_grads(plain, images, noise)
    torch.manual_seed(1)
    loss_ckpt, grads_ckpt = loss_and_grads(checkpointed, images, noise)
    assert loss_ckpt == loss
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=0, msg=name)


def test_fused_window_attention_equals_the_published_order():
    """What GPUs run (scaled_dot_product_attention) against the published order, in fp32 on
    the CPU: equal but for rounding."""
    from localmim_cli.encoders.swin_blocks import attend

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 2, 8, 16, generator=generator) for _ in range(3))
    for bias in (torch.randn(1, 4, 2, 8, 8, generator=generator), torch.randn(3, 4, 2, 8, 8, generator=generator)):
        bias[..., 5:] = -100.0                # other windows' tokens, as the groups mask them
        torch.testing.assert_close(attend(q, k, v, bias, 0.25, fused=True),
                                   attend(q, k, v, bias, 0.25, fused=False), rtol=1e-5, atol=1e-6)


def test_vit_blocks_above_the_highest_tap_are_frozen():
    """They never run in pretraining; trainable, they would leave DDP waiting for their gradients."""
    settings = ModelSettings.model_validate({**SMALLEST, "taps": [1], "encoder": {
        "name": "vit", "options": {"arch": None, "patch_size": 8, "embed_dim": 16, "depth": 3, "num_heads": 2}}})
    model = build_model(settings)
    loss, grads = loss_and_grads(model, torch.randn(2, 3, 16, 16), torch.rand(2, 4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(grads)
    assert not any(n.startswith(("encoder.blocks.1.", "encoder.blocks.2.")) for n in trainable)


def test_threads_default_to_the_cores_the_loader_leaves_and_train_threads_overrides(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("localmim_cli.engine.threads.usable_cores", lambda: 8)
    cpu = torch.device("cpu")
    torch.set_num_threads(8)                  # torch's default on 8 physical cores
    assert choose_intra_op_threads(cpu, 3).intra_op == 5
    assert choose_intra_op_threads(cpu, 12).intra_op == 1
    torch.set_num_threads(2)                  # a caller's own choice is a ceiling
    assert choose_intra_op_threads(cpu, 3).intra_op == 2
    chosen = choose_intra_op_threads(cpu, 3, requested=2)
    assert (chosen.intra_op, chosen.reason) == (2, "set by train.threads")
    assert PretrainSettings.model_validate({"train": {"threads": 3}}).train.threads == 3


def test_fsdp_needs_several_processes_and_not_fp16():
    with pytest.raises(UsageError, match="train.fsdp shards the model over the processes of a torchrun"):
        check_fsdp(distributed.World(), "fp32")
    with pytest.raises(UsageError, match="use bf16 or fp32"):
        check_fsdp(distributed.World(0, 2, 0), "fp16")
    with pytest.raises(ValueError, match="train.visualize_every"):
        PretrainSettings.model_validate({"train": {"fsdp": True, "visualize_every": 1}})


def test_two_process_fsdp_gives_the_ddp_losses_and_a_whole_checkpoint(tmp_path, tiny_config):
    """Same run sharded (FSDP2) and replicated (DDP) on two CPU processes (gloo): the same loss
    at every step, and checkpoints of the same keys and weights; and the finite-weights check
    before a save gives every process the same verdict."""
    driver = Path(__file__).with_name("fsdp_and_ddp_run.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(driver), str(tiny_config), str(tmp_path), "train.batch_size=2", "train.epochs=1",
                        "data.repeats=2"], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FSDP (sharded)" in r.stdout
    runs = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("ddp", "fsdp")}
    assert len(runs["ddp"]) == 3 and [m["step"] for m in runs["ddp"]] == [m["step"] for m in runs["fsdp"]]
    for a, b in zip(runs["ddp"], runs["fsdp"]):
        for key in [k for k in a if k.startswith("loss")]:
            assert b[key] == pytest.approx(a[key], rel=1e-6), (a["step"], key)
    ddp, fsdp = (checkpoints.load(tmp_path / name).model_state() for name in ("ddp", "fsdp"))
    assert fsdp.keys() == ddp.keys()
    for key in ddp:
        assert fsdp[key].shape == ddp[key].shape
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-5, atol=1e-6, msg=key)
    # Before a save the processes agree on the weights being finite, though each sees its shard only.
    verdicts = [json.loads((tmp_path / f"finite-{rank}.json").read_text()) for rank in (0, 1)]
    assert [v["own_shard_finite"] for v in verdicts] == [True, False]
    assert all(v["clean"] and not v["nan_in_one_shard"] for v in verdicts), verdicts
