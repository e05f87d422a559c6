"""`platformctl`: validate, render and run job specs on Kubernetes or on this machine.

A thin shell: each command parses flags and calls one library function. User errors
(bad spec, unknown job, unreachable cluster) print one line per problem and exit 2 (spec)
or 1 (everything else) — never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ps3_platform.spec import SpecError, check_against_pools, load, load_pools
from ps3_platform.spec.pools import PoolConfigError

EXIT_SPEC_ERROR = 2
EXIT_FAILURE = 1


class CommandError(Exception):
    """A one-line failure of a command (not a spec problem)."""


# ---- backend selection --------------------------------------------------------------------
def kube_config_present() -> bool:
    """True when a kubeconfig or an in-cluster service account is available (kubectl's rules)."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return True
    paths = os.environ.get("KUBECONFIG", "").split(os.pathsep) if os.environ.get("KUBECONFIG") else []
    paths.append(str(Path.home() / ".kube" / "config"))
    return any(p and Path(p).is_file() for p in paths)


def choose_backend(requested: str | None, quiet: bool = False) -> str:
    if requested:
        return requested
    chosen, why = ("kubernetes", "a kubeconfig was found") if kube_config_present() else (
        "local", "no kubeconfig or in-cluster config found")
    if not quiet:
        print(f"backend: {chosen} ({why}; choose with --backend)", file=sys.stderr)
    return chosen


def make_backend(name: str, args: argparse.Namespace):
    if name == "local":
        from ps3_platform.backends.local import LocalBackend

        return LocalBackend()
    from ps3_platform.backends.kubernetes import KubernetesBackend

    return KubernetesBackend(context=getattr(args, "context", None), namespace=getattr(args, "namespace", None))


# ---- spec helpers ---------------------------------------------------------------------------
def _load_checked(args: argparse.Namespace, pools=None):
    loaded = load(args.file, overrides=args.set)
    check_against_pools(loaded, pools or load_pools(args.pools))
    check_task_params(loaded)
    return loaded


def check_task_params(loaded) -> None:
    """Check every stage's params against its task's model (`ps3.tasks.params`) and the tasks' own
    checks (`ps3.tasks.PARAM_CHECKS`), so a misspelt key or a missing weights file fails here, not
    on a cluster an hour later."""
    import importlib

    from ps3_platform.spec.models import TrainingJob

    checks = importlib.import_module("ps3.tasks").PARAM_CHECKS
    check_model = importlib.import_module("ps3.tasks.params").check_params
    stages = [loaded.job.spec] if isinstance(loaded.job, TrainingJob) else list(loaded.job.spec.stages)
    issues = []
    for index, stage in enumerate(stages):
        problems = check_model(stage.task, stage.params)
        if stage.task in checks:
            module, _, name = checks[stage.task].partition(":")
            problems += getattr(importlib.import_module(module), name)(stage.params)
        prefix = ("spec",) if isinstance(loaded.job, TrainingJob) else ("spec", "stages", index)
        issues += [loaded.issue(prefix + ("params", *path), message) for path, message in problems]
    if issues:
        raise SpecError(issues)


def _compile(loaded, pools, namespace):
    from ps3_platform.compile import compile_job

    return compile_job(loaded.job, pools, namespace=namespace)


# ---- commands -------------------------------------------------------------------------------
def cmd_validate(args) -> int:
    loaded = _load_checked(args)
    job = loaded.job
    stages = len(job.spec.stages) if job.kind == "Pipeline" else 1
    print(f"{args.file}: valid {job.kind} {job.metadata.name!r} ({stages} stage{'s' * (stages != 1)})")
    _print_sizing_warnings(job)
    return 0


def cmd_render(args) -> int:
    from ps3_platform.compile import to_yaml

    pools = load_pools(args.pools)
    loaded = _load_checked(args, pools)
    objects = _compile(loaded, pools, args.namespace)
    _print_cluster_warnings(loaded.job)
    if args.output == "json":
        print(json.dumps(objects, indent=2, sort_keys=True))
    else:
        sys.stdout.write(to_yaml(objects))
    return 0


def _print_cluster_warnings(job) -> None:
    from ps3_platform.compile import cluster_warnings

    for warning in cluster_warnings(job):
        print(f"warning: {warning}", file=sys.stderr)


def _print_sizing_warnings(job) -> None:
    from ps3_platform.compile.cluster_advice import sizing_warnings

    for warning in sizing_warnings(job):
        print(f"warning: {warning}", file=sys.stderr)


def cmd_estimate(args) -> int:
    from ps3_platform.estimate import EstimateError
    from ps3_platform.estimate_cli import run_estimate

    pools = load_pools(args.pools)
    loaded = _load_checked(args, pools)
    try:
        return run_estimate(loaded.job, pools, args)
    except EstimateError as exc:
        raise CommandError(str(exc)) from None


def cmd_schema(args) -> int:
    from ps3_platform.spec.schema import job_schema

    print(json.dumps(job_schema(), indent=2))
    return 0


def cmd_submit(args) -> int:
    backend_name = choose_backend(args.backend)
    backend = make_backend(backend_name, args)
    pools = backend.pools(args.pools) if hasattr(backend, "pools") else load_pools(args.pools)
    loaded = _load_checked(args, pools)
    if args.allow_spec_change:
        for stage in _stage_bodies(loaded.job):
            stage.env = {**stage.env, "PS3_ALLOW_SPEC_CHANGE": "1"}
    _apply_resume_steps(loaded.job, args.resume_step)
    objects = []
    if backend_name == "kubernetes":
        objects = _compile(loaded, pools, args.namespace)
        _print_cluster_warnings(loaded.job)
    result = backend.submit(loaded.job, objects, replace=args.replace, delete_checkpoints=args.delete_checkpoints)
    print(result.message)
    if args.wait:
        from ps3_platform.backends.display import print_summary, progress_printer

        code = backend.wait(loaded.job.metadata.name, on_status=None if args.quiet else progress_printer())

        print_summary(backend.status(loaded.job.metadata.name), spec_file=args.file)
        return code
    return 0


def _stage_bodies(job):
    return list(job.spec.stages) if job.kind == "Pipeline" else [job.spec]


def _apply_resume_steps(job, requests: list[str]) -> None:
    """`--resume-step N` (a one-stage job) or `--resume-step STAGE=N` sets `checkpoint.resumeStep`."""
    bodies = _stage_bodies(job)
    by_name = {getattr(body, "name", None): body for body in bodies}
    for request in requests:
        stage_name, _, number = request.rpartition("=")
        if not number.isdigit() or int(number) < 1:
            raise CommandError(f"--resume-step {request!r}: expected a step number N >= 1 or STAGE=N")
        if stage_name:
            if stage_name not in by_name:
                raise CommandError(f"--resume-step {request!r}: no stage {stage_name!r} "
                                   f"(stages: {', '.join(n for n in by_name if n)})")
            body = by_name[stage_name]
        elif len(bodies) == 1:
            body = bodies[0]
        else:
            raise CommandError(f"--resume-step {request!r}: this pipeline has {len(bodies)} stages; name one as STAGE=N")
        body.checkpoint.resume_step = int(number)


def cmd_status(args) -> int:
    backend = make_backend(choose_backend(args.backend, quiet=True), args)
    status = backend.status(args.name)
    if args.output == "json":
        print(json.dumps(status.to_dict(), indent=2, sort_keys=True))
    else:
        from ps3_platform.backends.display import print_status

        print_status(status)
    return 0


def cmd_list(args) -> int:
    backend = make_backend(choose_backend(args.backend, quiet=True), args)
    jobs = backend.list()
    if args.output == "json":
        print(json.dumps([j.to_dict() for j in jobs], indent=2, sort_keys=True))
    else:
        from ps3_platform.backends.display import print_list

        print_list(jobs)
    return 0


def cmd_logs(args) -> int:
    backend = make_backend(choose_backend(args.backend, quiet=True), args)
    for line in backend.logs(args.name, stage=args.stage, rank=args.rank, follow=args.follow):
        sys.stdout.write(line if line.endswith("\n") else line + "\n")
        sys.stdout.flush()
    return 0


def cmd_cancel(args) -> int:
    backend = make_backend(choose_backend(args.backend, quiet=True), args)
    print(backend.cancel(args.name))
    return 0


def cmd_data(args) -> int:
    from ps3_platform.data_cli import run_data_command

    return run_data_command(args)


# ---- parser ---------------------------------------------------------------------------------
def _spec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="job spec (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a spec field, e.g. --set spec.train.steps=100 (repeatable)")
    p.add_argument("--pools", default=None, help="pool configuration file (default: built-in or $PS3_PLATFORM_POOLS)")


def _cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["local", "kubernetes"], default=None,
                   help="where to run (default: kubernetes if a kubeconfig exists, else local)")
    p.add_argument("-n", "--namespace", default=None, help="Kubernetes namespace (overrides metadata.namespace)")
    p.add_argument("--context", default=None, help="kubeconfig context")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="platformctl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a spec (and its pools) without running it")
    _spec_options(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("render", help="print the Kubernetes objects a spec compiles to")
    _spec_options(p)
    p.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    p.add_argument("-n", "--namespace", default=None)
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("submit", help="run a spec on the cluster or locally")
    _spec_options(p)
    _cluster_options(p)
    p.add_argument("--replace", action="store_true",
                   help="replace a job of the same name whose spec changed (its local checkpoints are kept aside)")
    p.add_argument("--delete-checkpoints", action="store_true",
                   help="with --replace: delete the replaced local run's checkpoints (listed) instead of keeping them")
    p.add_argument("--allow-spec-change", action="store_true",
                   help="let workers resume from checkpoints written under a different spec")
    p.add_argument("--resume-step", action="append", default=[], metavar="[STAGE=]N",
                   help="resume from committed step N instead of the newest (newer steps are set aside, not deleted)")
    p.add_argument("--wait", action="store_true", help="follow progress until the job ends")
    p.add_argument("-q", "--quiet", action="store_true", help="with --wait: print only the final summary")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("estimate", help="per stage: parameters, FLOPs, GPU memory, fit, time and cost, before submitting")
    _spec_options(p)
    from ps3_platform.estimate_cli import add_estimate_options

    add_estimate_options(p)
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("list", help="list jobs")
    _cluster_options(p)
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("status", help="show a job's stages, progress and evaluation")
    p.add_argument("name")
    _cluster_options(p)
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="print a job's worker logs")
    p.add_argument("name")
    _cluster_options(p)
    p.add_argument("--stage", default=None)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("-f", "--follow", action="store_true")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("cancel", help="stop a job and remove its objects")
    p.add_argument("name")
    _cluster_options(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("schema", help="print the job spec JSON Schema")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("data", help="dataset shards: index, check, import LLaVA conversations")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    for action, doc in (("index", "write index.json for a source directory"),
                        ("check", "count samples, boxes and bad records per shard")):
        q = data_sub.add_parser(action, help=doc)
        q.add_argument("uri", help="source directory URI (file://, s3://)")
        q.add_argument("-o", "--output", choices=["table", "json"], default="table")
    q = data_sub.add_parser("import-llava", help="LLaVA-format JSON + images -> VILA-HD conversation shards")
    q.add_argument("json_uri", help="the LLaVA JSON list (id, image, conversations, optional box/boxes)")
    q.add_argument("image_root", help="directory the items' image paths are relative to")
    q.add_argument("output_uri", help="shard directory to write, with its index (file://, s3://)")
    q.add_argument("--source", default="llava", help="source name recorded in every sample")
    q.add_argument("--samples-per-shard", type=int, default=1000)
    q.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_data)

    from ps3_platform.infer_cli import add_infer_parser

    add_infer_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return EXIT_SPEC_ERROR
    except PoolConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SPEC_ERROR
    except _compile_errors() as exc:
        print(f"{getattr(args, 'file', 'spec')}: error: {exc}", file=sys.stderr)
        return EXIT_SPEC_ERROR
    except (CommandError, _backend_errors()) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _compile_errors() -> type[Exception]:
    from ps3_platform.compile import CompileError

    return CompileError


def _backend_errors() -> type[Exception]:
    from ps3_platform.backends.errors import BackendError

    return BackendError


if __name__ == "__main__":
    sys.exit(main())
