"""The ``alignflow`` command line.

``run`` runs one round of the pipeline (no ``--config``: the embedded demo); ``demo --rounds N``
closes the loop (feedback from the champion, retrain, promote, repeat); ``ingest SOURCE``
validates only; ``promote``, ``rollback`` and ``status`` work the registry; ``serve`` starts
the scheduled deployments. ``--config FILE`` and ``--set key=value`` work on every command.

Prefect and MLflow are imported only after the home folder is known, so the embedded Prefect
database lands in ``<home>/prefect`` unless ``PREFECT_HOME`` or ``PREFECT_API_URL`` is set.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import warnings
from pathlib import Path

from flows import termination

# OpenMP threads that spin while waiting make torch on a busy 2-core CPU up to 20x slower
# (measured: sampling 258 sequences took 83 s with spinning threads, 4.4 s with passive ones).
# Set before torch loads; training processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

COMMANDS = ("run", "demo", "ingest", "build-dataset", "promote", "rollback", "status", "serve", "monitor",
            "eval-export")
PREFLIGHT_COMMANDS = ("run", "demo", "serve")
"""Commands that train: their config is checked (tasks/preflight.py) before Prefect starts."""
HOME_COMMANDS = ("status", "ingest", "build-dataset", "promote", "rollback", "monitor", "eval-export")
"""Commands that, without --config, use the pipeline that has run in the home (flows/home.py),
never the demo's. With none there: ``status`` says so, ``ingest`` and ``build-dataset`` use the
default data settings, and the registry commands stop (they would act on a pipeline's models)."""
DEFAULT_DATA_COMMANDS = ("ingest", "build-dataset")


def _common(parser: argparse.ArgumentParser) -> None:
    command = parser.prog.split()[-1]
    if command in DEFAULT_DATA_COMMANDS:
        default = "the pipeline that ran in this home, else default data settings"
    elif command in HOME_COMMANDS:
        default = "the pipeline that ran in this home"
    else:
        default = "the embedded demo"
    parser.add_argument("--config", "-c", metavar="FILE", help=f"pipeline YAML (default: {default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set dpo.beta=0.2 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="alignflow",
        description="Align language models with user feedback: validate, build preferences, train, "
                    "evaluate, promote, monitor — on Prefect and MLflow.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the pipeline once (no --config: the embedded demo)")
    _common(run)
    run.add_argument("--only-if-new-data", action="store_true",
                     help="exit at once when the landing folder has no new files")
    demo = sub.add_parser("demo", help="closed loop: feedback from the champion, retrain, promote, repeat")
    _common(demo)
    demo.add_argument("--rounds", type=int, default=3, help="rounds to run (default 3)")
    ingest = sub.add_parser("ingest", help="validate feedback only: report and exit code")
    _common(ingest)
    ingest.add_argument("source", help="file, folder, saved dataset or hub dataset id")
    ingest.add_argument("--kind", choices=["pairwise", "ranking", "rating", "binary", "demonstration"],
                        help="feedback kind (default: detected from the columns)")
    ingest.add_argument("--column", action="append", metavar="SOURCE=FIELD",
                        help="rename a column first, as data.sources[].columns (repeatable; e.g. question=prompt)")
    build = sub.add_parser("build-dataset", help="turn feedback files into the library's training tables "
                                                 "(pairs/prompts/demonstrations Parquet per split)")
    _common(build)
    build.add_argument("sources", nargs="+", metavar="SOURCE", help="files, folders or saved datasets")
    build.add_argument("--out", required=True, metavar="DIR", help="folder for the tables (created)")
    build.add_argument("--kind", choices=["pairwise", "ranking", "rating", "binary", "demonstration"],
                       help="feedback kind of every source (default: detected from the columns)")
    promote = sub.add_parser("promote", help="point the champion alias at a policy version")
    _common(promote)
    promote.add_argument("--version", required=True, help="model version number")
    rollback = sub.add_parser("rollback", help="put the previous champion back")
    _common(rollback)
    status = sub.add_parser("status", help="champion, challenger and recent runs")
    _common(status)
    serve = sub.add_parser("serve", help="serve the scheduled retraining and monitoring deployments")
    _common(serve)
    monitor = sub.add_parser("monitor", help="check new feedback for drift against the champion")
    _common(monitor)
    export = sub.add_parser("eval-export", help="a blinded side-by-side sheet (CSV, JSONL) of two policy versions "
                                                "for people to judge (tasks/evaluation/human.py)")
    _common(export)
    export.add_argument("--first", default="champion", help="alias or version number (default: champion)")
    export.add_argument("--second", default="challenger", help="alias or version judged against the first "
                                                               "(default: challenger)")
    export.add_argument("--prompts", metavar="FILE", help="prompts (.parquet/.jsonl/.csv with a prompt column; "
                                                          "default: the newest build's test prompts)")
    export.add_argument("--num-prompts", type=int, help="at most this many prompts (default: evaluation.num_prompts)")
    export.add_argument("--out", metavar="DIR", help="folder for the sheet (default: <home>/human-eval/<sheet id>)")
    return parser


def _api_credentials_out_of_urls() -> None:
    """A user:password in ``PREFECT_API_URL`` becomes ``PREFECT_API_AUTH_STRING`` (the same basic
    auth) unless one is set, and Prefect's UI links ("View at ...", serve's banner), derived from
    the API URL, get a masked one: Prefect prints the URL in every flow run's log."""
    from tasks.redact import redact_url, split_credentials

    api = os.environ.get("PREFECT_API_URL")
    if not api:
        return
    clean, user, password = split_credentials(api)
    if password is not None and not os.environ.get("PREFECT_API_AUTH_STRING"):
        os.environ["PREFECT_API_URL"] = clean
        os.environ["PREFECT_API_AUTH_STRING"] = f"{user}:{password}"
    if not os.environ.get("PREFECT_UI_URL"):
        os.environ["PREFECT_UI_URL"] = redact_url(os.environ["PREFECT_API_URL"]).rstrip("/").removesuffix("/api")


def _prepare_environment(home: Path) -> None:
    """Embedded defaults for Prefect before it is imported; explicit settings win."""
    home.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no phoning home from the embedded server
    # Prefect's 20 s for its temporary server to answer is too short on a busy 2-core machine
    # (seen: "Timed out while attempting to connect to ephemeral Prefect API server").
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    # Persisted results are JSON, never pickles (a pickle in a shared home runs code on load);
    # cached stages also use tasks.results' restricted records. Not overridable on purpose.
    os.environ["PREFECT_RESULTS_DEFAULT_SERIALIZER"] = "json"
    # MLflow prints "View run ... at: <tracking URI>" after every run against a server, user:password
    # included; the end-of-run summary prints the same link with credentials masked instead.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    _api_credentials_out_of_urls()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


FLOW_COMMANDS = ("run", "demo", "monitor")
"""Commands that run a Prefect flow in this process (``serve`` starts its own API)."""


def _api_for(command: str, home: Path) -> contextlib.AbstractContextManager:
    """The embedded Prefect API in its own session for the commands that run flows (``run``,
    ``demo``, ``monitor``) when ``PREFECT_API_URL`` is unset (flows/api_server.py): a signal to the
    command's whole process group then leaves the API up to record the flow run as CRASHED (Prefect's
    temporary server died with the group). Other commands run no flow and start no API."""
    if command not in FLOW_COMMANDS:
        return contextlib.nullcontext()
    from flows.api_server import embedded_api

    return embedded_api(home, command=command)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script. Returns the process exit code: 0, 2 for a bad config or
    input, 130 after Ctrl-C, 143 after SIGTERM (flows/termination.py), or the command's own."""
    args = build_parser().parse_args(argv)
    from alignment.config import ConfigError
    from tasks.config import load_pipeline_config

    try:
        cfg = load_pipeline_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"alignflow: {err}", file=sys.stderr)
        return 2
    if args.config is None and args.command in HOME_COMMANDS:  # the home's pipeline, not the demo
        from flows.home import default_data_config, home_pipeline

        found, note = home_pipeline(cfg.home, args.overrides)
        if found is None and args.command not in DEFAULT_DATA_COMMANDS:
            print(f"alignflow: {note}", file=sys.stderr)
            return 0 if args.command == "status" else 2
        cfg = found or default_data_config(cfg.home, args.overrides)
        if args.command != "status":
            note = note if found else f"no pipeline has run in {cfg.home}: default data settings"
            note += f"; data.quarantine_max_share {cfg.data.quarantine_max_share:g}"
        print(f"alignflow: {note}", file=sys.stderr)
    if args.command in PREFLIGHT_COMMANDS:  # before Prefect starts: one line naming a bad field
        from tasks.preflight import run_preflight

        if code := run_preflight(cfg):
            return code
    _prepare_environment(cfg.home)
    # MLflow's schema hints and type-hint advice on every logged model are noise in a run's output.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
    if args.command in (*PREFLIGHT_COMMANDS, *FLOW_COMMANDS):  # before any flow: a moved or copied home stops here
        from tasks import tracking

        try:
            tracking.check_home(cfg.home, cfg.pipeline.name)
        except tracking.HomeMovedError as err:
            print(f"alignflow: {err}", file=sys.stderr)
            return 2
    from flows import commands

    handler = getattr(commands, f"cmd_{args.command.replace('-', '_')}")
    # serve stops its runner on SIGTERM itself and starts its own API (flows/deployments.py)
    on_sigterm = termination.command_handler() if args.command != "serve" else contextlib.nullcontext()
    rounds = args.command in ("run", "demo")
    stopped = functools.partial(_stopped, how="; the next run on this home finishes the round" if rounds else "")
    with on_sigterm:
        try:
            with _api_for(args.command, cfg.home):
                code = int(handler(cfg, args) or 0)
        except termination.Terminated:
            return stopped(sigterm=True)
        except KeyboardInterrupt:
            return stopped(sigterm=False)
        except ConfigError as err:  # a field found wrong mid-run (e.g. a batch larger than the split)
            print(f"alignflow: {err}", file=sys.stderr)
            return 2
        except Exception as err:  # raised while a signal unwound the command (its API server gone too)
            behind = termination.signal_behind(err)
            sigterm = termination.requested() or isinstance(behind, termination.Terminated)
            if behind is None and not sigterm:
                raise
            return stopped(sigterm, f" ({type(err).__name__} while stopping)")
        if termination.requested():  # its exception was lost (flows/termination.py) and the work ran on
            return _stopped(sigterm=True, how=" as the command ended")
    return code


def _stopped(sigterm: bool, detail: str = "", how: str = "") -> int:
    """One line for a command a signal ended, then its exit code (143 for SIGTERM, 130 for Ctrl-C)
    once Prefect's workers had their bounded drain (:func:`termination.exit_code_after_signal`)."""
    if sigterm:
        print(f"alignflow: terminated (SIGTERM){how}{detail}", file=sys.stderr)
        return termination.exit_code_after_signal(143)
    print(f"alignflow: interrupted{detail}", file=sys.stderr)
    return termination.exit_code_after_signal(130)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
