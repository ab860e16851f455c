"""``lverse train-augvae`` / ``lverse train-biart`` (and ``train_augvae.py`` / ``train_biart.py``).

    --config FILE [overrides...]   start a run from a YAML recipe
    --describe                     print the model's size and layout, allocate nothing
    --resume [RUN_DIR]             continue a run from its newest intact checkpoint; with no value
                                   the config's run_dir; RUN_DIR/config.yaml is used when --config
                                   is absent. Overrides may change only the learning rate, the step
                                   budget, logging and checkpoint cadence (lverse.train.rundir)
    --resume auto --config FILE    continue the config's run if it has a checkpoint, else start it:
                                   what torchrun --max-restarts and cluster requeues should run

Exit codes: 0 done or stopped by a signal (checkpointed), 1 the run cannot go on (divergence,
unusable data, a run directory in use: lverse.train.guard), 2 a bad config or command line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

from lverse.config import ConfigError, load_config
from lverse.dist import cleanup, leave
from lverse.train.guard import RunError
from lverse.train.loop import Task, TrainConfig, Trainer

C = TypeVar("C")


def resolve_resume_dir(arg: str, train: TrainConfig) -> str:
    """``--resume`` with no value → the config's run dir; a step dir → its run dir; ``auto`` →
    ``auto`` (the config's run dir decides). Sets train.run_dir."""
    if arg == "auto":
        train.run_dir = str(train.run_dir or Path("runs") / train.name)
        return arg
    p = Path(arg) if arg else Path(train.run_dir or Path("runs") / train.name)
    run_dir = p.parent.parent if _is_step_dir(p) else p
    train.run_dir = str(run_dir)
    return str(p)


def _is_step_dir(p: Path) -> bool:
    return (p / "state.pt").is_file() or (p.name.startswith("step_") and p.parent.name == "checkpoints")


def run_stage(
    argv: list[str] | None,
    description: str,
    config_cls: type[C],
    make_task: Callable[[C], Task],
    describe: Callable[[C], dict[str, Any]],
    prog: str | None = None,
) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    ap.add_argument("--describe", action="store_true", help="print the parameter count and layout, then exit")
    ap.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                    help="continue from the newest intact checkpoint of RUN_DIR (or of a step dir, or of the config's "
                         "run_dir); 'auto' with --config: resume the config's run if it has a checkpoint, else start it")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 train.lr=1e-4")
    args = ap.parse_args(argv)
    # Under torchrun every path ends in leave(): see lverse.dist.leave for why.
    return leave(_run(args, config_cls, make_task, describe))


def _run(args: argparse.Namespace, config_cls: type[C], make_task: Callable[[C], Task],
         describe: Callable[[C], dict[str, Any]]) -> int:
    try:
        config_path = args.config
        if args.resume == "auto" and not config_path:
            raise ConfigError("--resume auto needs --config FILE (it starts the run from it when there is no checkpoint yet)")
        if args.resume and not config_path:
            rd = Path(args.resume)
            config_path = str((rd.parent.parent if _is_step_dir(rd) else rd) / "config.yaml")
        if config_path is None:
            raise ConfigError("give --config FILE (or --resume RUN_DIR)")
        cfg = load_config(config_cls, config_path, args.overrides)
        if args.describe:
            print(json.dumps(describe(cfg), indent=2))
            return 0
        train: TrainConfig = cfg.train  # type: ignore[attr-defined]
        resume = resolve_resume_dir(args.resume, train) if args.resume is not None else None
        trainer = Trainer(train, lambda: make_task(cfg), full_config=cfg, resume=resume)
        result = trainer.fit()
        if not result["stopped"]:
            trainer.export()
            if trainer.info.is_main:
                print(json.dumps(result))
            # Under torchrun every rank gets here together; leaving the gloo/NCCL group without a
            # barrier aborted a rank now and then. Not on a stop or an error: a peer may be gone.
            cleanup()
        return 0
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def train_augvae(argv: list[str] | None = None) -> int:
    import lverse.shapes  # noqa: F401  (registers data.kind=shapes)
    from lverse.train.stage1 import Stage1Config, Stage1Task, describe

    return run_stage(argv, "Train AugVAE-ML (stage 1a) or finetune AugVAE-SL (stage 1b).", Stage1Config, Stage1Task,
                     lambda cfg: describe(cfg.model), prog="lverse train-augvae")


def train_biart(argv: list[str] | None = None) -> int:
    from lverse.models.biart import describe
    from lverse.train.stage2 import Stage2Config, Stage2Task

    return run_stage(argv, "Train BiART (stage 2) on token shards from `lverse encode`.", Stage2Config, Stage2Task,
                     lambda cfg: describe(cfg.model), prog="lverse train-biart")
