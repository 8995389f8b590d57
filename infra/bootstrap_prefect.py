"""Create (or update) what the pipeline's deployments need on a Prefect server. Idempotent.

- the work pool (``process`` for the compose set-up, ``kubernetes`` with
  infra/k8s/base-job-template.json for a cluster with GPU nodes);
- the global concurrency limit ``gpu``: slots = GPUs the pool may use at once. Training tasks
  hold ``occupy = <processes>`` slots while their process runs, so runs queue instead of
  oversubscribing GPUs;
- the global concurrency limit ``registry`` (1 slot): held around "read champion, gate,
  move alias", so two pipeline runs cannot both promote against the same old champion.

Where a limit does not exist (the embedded demo), Prefect's ``concurrency()`` does not wait
on it, so the same code runs embedded and in production.

Usage (PREFECT_API_URL must point at the server):
    python infra/bootstrap_prefect.py --pool alignflow-process --type process --gpu-slots 1
    python infra/bootstrap_prefect.py --pool alignflow-k8s --type kubernetes \\
        --base-job-template infra/k8s/base-job-template.json --gpu-slots 8
Exit code 0 on success; the error names what failed otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

GPU_LIMIT = "gpu"
REGISTRY_LIMIT = "registry"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default="alignflow-process", help="work pool name")
    parser.add_argument("--type", default="process", choices=["process", "kubernetes", "docker"],
                        help="work pool (worker) type")
    parser.add_argument("--base-job-template", type=Path, default=None,
                        help="JSON base job template (required for kubernetes: the worker package "
                             "that would supply a default is not installed where this runs)")
    parser.add_argument("--gpu-slots", type=int, default=1, help="slots of the 'gpu' concurrency limit")
    parser.add_argument("--pool-concurrency", type=int, default=None,
                        help="most flow runs the pool runs at once (default: unlimited)")
    return parser.parse_args(argv)


def base_job_template(kind: str, path: Path | None) -> dict:
    """The pool's template: the given file, else the process worker's default."""
    if path is not None:
        template = json.loads(path.read_text())
        missing = {"job_configuration", "variables"} - set(template)
        if missing:
            raise SystemExit(f"{path}: base job template lacks {sorted(missing)}")
        return template
    if kind == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    raise SystemExit(f"--base-job-template is required for a {kind} pool")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gpu_slots < 0:
        raise SystemExit("--gpu-slots must be >= 0")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise SystemExit("PREFECT_API_URL is not set: point it at the Prefect server (…/api)")
    template = base_job_template(args.type, args.base_job_template)
    with get_client(sync_client=True) as client:
        pool = client.create_work_pool(
            WorkPoolCreate(name=args.pool, type=args.type, base_job_template=template,
                           concurrency_limit=args.pool_concurrency),
            overwrite=True,
        )
        if pool.type != args.type:
            raise SystemExit(f"work pool {args.pool!r} exists with type {pool.type!r}, not {args.type!r}: "
                             "delete it or choose another name")
        client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, args.gpu_slots)
        client.upsert_global_concurrency_limit_by_name(REGISTRY_LIMIT, 1)
    from tasks.redact import redact_url

    print(f"work pool {args.pool!r} ({args.type}) ready on {redact_url(PREFECT_API_URL.value())}; "
          f"limits: {GPU_LIMIT}={args.gpu_slots}, {REGISTRY_LIMIT}=1", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_CLI_COLORS", "false")
    sys.exit(main())
