"""The console script starts, lists its commands, and config errors name the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from flows.cli import COMMANDS, build_parser, main

SCRIPT = Path(sys.executable).with_name("alignflow")


def test_console_script_help_lists_every_command():
    out = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in COMMANDS:
        assert command in out.stdout


def test_subcommands_take_config_and_set_overrides():
    args = build_parser().parse_args(["demo", "--rounds", "2", "--config", "x.yaml", "--set", "dpo.beta=0.2"])
    assert (args.command, args.rounds, args.config, args.overrides) == ("demo", 2, "x.yaml", ["dpo.beta=0.2"])


def test_bad_override_names_the_field(capsys):
    assert main(["status", "--set", "dpo.beta=-1"]) == 2
    err = capsys.readouterr().err
    assert "dpo.beta" in err and "greater than 0" in err


def test_unknown_field_is_named(capsys):
    assert main(["status", "--set", "pipeline.nme=x"]) == 2
    assert "pipeline.nme" in capsys.readouterr().err


def test_missing_config_file_is_reported(capsys, tmp_path):
    assert main(["status", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def _pairwise_file(path, bad: int, good: int = 20):
    import json

    rows = [{"prompt": f"Review {i}", "response_a": f"good film {i}", "response_b": f"bad film {i}", "choice": "a"}
            for i in range(good)]
    rows += [{"prompt": f"Broken {i}", "response_a": "same", "response_b": "same", "choice": "maybe"}
             for i in range(bad)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_ingest_command_reports_and_exits_by_threshold(tmp_path, capsys):
    home = f"pipeline.home={tmp_path / 'home'}"
    ok = _pairwise_file(tmp_path / "ok.jsonl", bad=0)
    assert main(["ingest", str(ok), "--set", home]) == 0
    assert "20" in capsys.readouterr().out
    bad = _pairwise_file(tmp_path / "bad.jsonl", bad=10)
    assert main(["ingest", str(bad), "--kind", "pairwise", "--set", home]) == 1
    out = capsys.readouterr().out
    assert "10" in out and "FAILED" in out
    assert main(["ingest", str(tmp_path / "missing.jsonl"), "--set", home]) == 2


def test_config_help_names_each_commands_default():
    """``--config``'s help says what a command uses without it: the demo for the commands that
    train, the home's pipeline for the registry and status commands, and for ingest and
    build-dataset the default data settings when no pipeline ran (not "the embedded demo")."""
    from flows.cli import build_parser

    actions = {name: sub for action in build_parser()._subparsers._group_actions
               for name, sub in action.choices.items()}

    def config_help(command: str) -> str:
        return next(a.help for a in actions[command]._actions if "--config" in a.option_strings)

    assert config_help("run").endswith("(default: the embedded demo)")
    assert config_help("promote").endswith("(default: the pipeline that ran in this home)")
    for command in ("ingest", "build-dataset"):
        assert "else default data settings" in config_help(command) and "demo" not in config_help(command)


def test_a_run_in_a_copied_home_stops_before_any_flow_naming_the_homes(tmp_path, capsys, monkeypatch):
    import shutil

    from tasks import tracking

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(name, "-")
        monkeypatch.delenv(name)
    monkeypatch.setattr(tracking, "_ENV_SET_BY_US", {})
    tracking.configure(tmp_path / "a", "demo")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert main(["run", "--set", f"pipeline.home={tmp_path / 'b'}"]) == 2
    err = capsys.readouterr().err
    assert "pipeline.home:" in err and "moved or copied from" in err and str((tmp_path / "a").resolve()) in err
    assert not (tmp_path / "b" / "prefect").exists()  # stopped before Prefect's home was used
