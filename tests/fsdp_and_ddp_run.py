"""Under torchrun: the same pretraining run twice in the same processes, replicated (DDP) into
OUT/ddp and sharded (train.fsdp) into OUT/fsdp. One launch for both halves the start-up cost.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_and_ddp_run.py CONFIG OUT SET...
"""

import sys
from pathlib import Path

import torch.distributed
from rich.console import Console

from localmim_cli.config.resolve import resolve_settings
from localmim_cli.config.schema import PretrainSettings
from localmim_cli.tasks.pretrain import pretrain

config, out, sets = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
# One process group for both runs: tearing it down and joining a new one on the same rendezvous
# port between them races (a "connection reset" now and then).
torch.distributed.init_process_group("gloo")
for name, fsdp in (("ddp", False), ("fsdp", True)):
    resolved = resolve_settings(PretrainSettings, config=config, sets=[*sets, f"train.fsdp={str(fsdp).lower()}"])
    pretrain(resolved, out / name, console=Console(soft_wrap=True))
