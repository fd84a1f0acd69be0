"""Under torchrun: the same pretraining run twice in the same processes, replicated (DDP) into
OUT/ddp and sharded (train.fsdp) into OUT/fsdp. One launch for both halves the start-up cost.
Then the finite-weights check before a save on a sharded model whose NaN lies in the last
process's shard alone: each process writes its verdict to OUT/finite-RANK.json.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_and_ddp_run.py CONFIG OUT SET...
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed
from rich.console import Console

from localmim_cli.config.resolve import resolve_settings
from localmim_cli.config.schema import PretrainSettings
from localmim_cli.engine import distributed, wrapping
from localmim_cli.engine.loop import weights_finite
from localmim_cli.tasks.pretrain import pretrain

config, out, sets = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
# One process group for both runs: tearing it down and joining a new one on the same rendezvous
# port between them races (a "connection reset" now and then).
torch.distributed.init_process_group("gloo")
for name, fsdp in (("ddp", False), ("fsdp", True)):
    resolved = resolve_settings(PretrainSettings, config=config, sets=[*sets, f"train.fsdp={str(fsdp).lower()}"])
    pretrain(resolved, out / name, console=Console(soft_wrap=True))

world, cpu = distributed.from_environment(), torch.device("cpu")
blocks = [torch.nn.Linear(4, 4) for _ in range(2)]
model = torch.nn.Sequential(*blocks)
wrapping.wrap(model, blocks, True, world, cpu, "fp32")
verdicts = {"clean": weights_finite(model, world, cpu)}
if world.rank == world.size - 1:   # the last rows of the first weight: the last process's shard only
    with torch.no_grad():   # into the shard's storage, outside autograd's view of the DTensor
        model[0].weight.to_local()[-1, 0] = float("nan")
verdicts["nan_in_one_shard"] = weights_finite(model, world, cpu)
verdicts["own_shard_finite"] = bool(torch.isfinite(model[0].weight.to_local()).all())
(out / f"finite-{world.rank}.json").write_text(json.dumps(verdicts))
torch.distributed.destroy_process_group()
