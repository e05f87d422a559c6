"""Worker entry point: `python -m ps3_platform.runtime --spec FILE --stage NAME`.

Runs the same way under torchrun (local backend, PyTorchJob pods) and on its own
(one process). Exit codes follow the PyTorchJob `ExitCode` policy: 0 done, 2 a
permanent user error (bad spec, unknown task, spec changed), 143 preempted after a
checkpoint (retryable), anything else a crash.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

from ps3_platform.spec import BatchPlanError, SpecError, load_text, plan_batch, spec_hash, stages_of

from .build import RunSetupError, run_stage
from .distributed import world_from_env
from .signals import PREEMPTED_EXIT_CODE

USER_ERROR_EXIT_CODE = 2
#: Set by `platformctl submit --allow-spec-change` in every stage's env (pods and local workers).
ALLOW_SPEC_CHANGE_ENV = "PS3_ALLOW_SPEC_CHANGE"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ps3_platform.runtime", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="resolved job spec (YAML)")
    parser.add_argument("--stage", required=True, help="stage to run")
    parser.add_argument("--allow-spec-change", action="store_true",
                        help="resume from a checkpoint written by a different spec")
    return parser.parse_args(argv)


def _logger(rank: int) -> logging.Logger:
    logging.basicConfig(
        level=os.environ.get("PS3_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    return logging.getLogger("ps3_platform.runtime")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    world = world_from_env()
    log = _logger(world.rank)
    try:
        try:
            text = Path(args.spec).read_text()
        except OSError as exc:
            raise RunSetupError(f"cannot read spec {args.spec}: {exc.strerror}") from None
        loaded = load_text(text, args.spec)
        stage = next((s for s in stages_of(loaded.job) if s.name == args.stage), None)
        if stage is None:
            raise RunSetupError(f"stage {args.stage!r} is not in {args.spec}")
        plan = plan_batch(stage.train.global_batch, world.world_size, stage.train.micro_batch)
        stage_hash = spec_hash(stage.model_dump(mode="json", by_alias=True))
        allow = args.allow_spec_change or os.environ.get(ALLOW_SPEC_CHANGE_ENV) == "1"
        outcome = run_stage(loaded.job, stage, world, plan, log, spec_hash=stage_hash, allow_spec_change=allow)
    except (SpecError, BatchPlanError, RunSetupError) as exc:
        log.error("%s", str(exc).replace("\n", "; "))
        return USER_ERROR_EXIT_CODE
    except yaml.YAMLError as exc:  # pragma: no cover - the spec was rendered by us
        log.error("cannot parse spec %s: %s", args.spec, exc)
        return USER_ERROR_EXIT_CODE
    if outcome == "preempted":
        log.warning("stopped by a signal after a checkpoint; exiting %d (retryable)", PREEMPTED_EXIT_CODE)
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
