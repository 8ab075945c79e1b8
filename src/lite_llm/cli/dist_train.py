"""`lite-llm train` as one rank of a `torchrun` launch: the same command, split over ranks.

Every rank runs this with the same arguments.  Checks that can fail (degrees against the world
size, an existing run, the batch split) run on every rank before any collective, so a mistake
ends all of them with the same sentence; rank 0 alone prints and writes metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import LiteLLMError
from .app import console, model_config_from, print_scores


def train_distributed(
    *, data: Path, output: Path, init_from: Optional[Path], preset: Optional[str], model_config: Optional[Path], config: Optional[Path],
    resume: bool, overwrite: bool, quiet: bool, device: torch.device, given: dict[str, Any],
) -> None:
    import torch.distributed as dist

    from ..checkpoint import load_checkpoint
    from ..data import TokenData
    from ..dist.checkpoint import latest_sharded, read_meta
    from ..dist.launch import describe_collective_failure, init_distributed, shutdown
    from ..dist.parallelize import parallelize
    from ..dist.trainer import DistributedTrainer
    from ..model import build_model
    from ..train import TrainConfig
    from .train import _check_vocab, _explicit, _refuse_existing_run, _resume_fields

    latest = latest_sharded(output) if resume else None
    if resume and latest is None:
        raise LiteLLMError(f"nothing to resume in {output}: it has no complete sharded checkpoint; drop --resume to start a new run")
    if latest is not None:
        saved = dict(read_meta(latest)["trainer"].get("train_config") or {})
        file_fields = TrainConfig.from_file(config).to_dict() if config else {}
        cfg = TrainConfig.from_dict(_resume_fields(saved, {**_explicit(file_fields), **given}))
    else:
        fields = (TrainConfig.from_file(config) if config else TrainConfig()).to_dict()
        cfg = TrainConfig.from_dict({**fields, **given})
    ranks = init_distributed(cfg.parallel or None, device)
    try:
        if latest is None:
            if ranks.is_main:
                _refuse_existing_run(output, overwrite)
            dist.barrier()
        dataset = TokenData(data)
        if init_from is not None:
            loaded = load_checkpoint(init_from, device="cpu")
            model = loaded.model
        else:
            model = build_model(model_config_from(preset, model_config), seed=cfg.seed)
        _check_vocab(model.config.vocab_size, dataset.tokenizer.vocab_size)
        model = parallelize(model.to(ranks.device), ranks)
        trainer = DistributedTrainer(model, dataset, cfg, ranks, run_dir=output, show_progress=not quiet, tokenizer=dataset.tokenizer)
        if init_from is not None and latest is None:
            trainer.inherit(loaded.progressive)
        if latest is not None:
            trainer.resume_sharded(latest)
            if ranks.is_main:
                console.print(f"resumed from {latest} at step {trainer.step} of {cfg.steps}")
        if ranks.is_main:
            console.print(f"parallel: {ranks.degrees} on {ranks.degrees.world_size} ranks; device: {trainer.runtime_summary()}")
        result = trainer.train()
        if ranks.is_main:
            print_scores(result.final_eval)
            console.print(f"checkpoint: {result.checkpoint}")
    except (RuntimeError, ConnectionError) as exc:
        message = describe_collective_failure(exc)
        if message is None:
            raise
        raise LiteLLMError(message) from None
    finally:
        shutdown()
