"""The alignment pipeline flow: one round of ingest → preferences → (SFT) → reward model →
policy update → evaluation → register + promote, tracked in MLflow.

Each stage is a Prefect task (``tasks/stages``); stages pass records (paths, digests,
numbers), never models. Training stages are cached on their inputs, config section and the
code version of ``alignment/``, so a re-run with nothing new skips them, and a re-run after a
crash resumes the interrupted training from its last checkpoint.

The flow is a straight list of steps (functions below it) inside one :class:`PipelineRound`,
which owns the MLflow parent run, the stage timings and the summary, and ends the run in one
place; a step that finds nothing more to do stops the round with :meth:`PipelineRound.stop`.
A new step (e.g. one per round state) is a function here and a line in the list.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from alignment.config import apply_overrides, validate_config
from flows import termination
from flows.home import saved_config_path
from tasks import tracking
from tasks.config import PipelineConfig, load_pipeline_config, to_yaml
from tasks.data.landing import CONSUMED, ledger_for
from tasks.data.validate import QuarantineThresholdExceeded
from tasks.evaluation.human import await_people, human_evaluation_step
from tasks.faults import fault_point
from tasks.lock import home_lock
from tasks.methods import label, method
from tasks.records import ModelRecord, StageTiming
from tasks.round import ENDS, FAILED, SETTLES, FlowMarks, RoundLog, RoundRecord, close_dead_flow_runs
from tasks.stages.cached import run_cached
from tasks.stages.data import (
    DatasetRecord,
    IngestRecord,
    build_task,
    data_dir,
    dataset_present,
    ingest_settings,
    ingest_task,
    log_round_dataset,
)
from tasks.stages.demo import (
    demo_base_model_task,
    finish_simulated_landing,
    landing_is_empty,
    reward_start,
    simulate_feedback_task,
)
from tasks.stages.evaluate import evaluate_task, evaluation_complete, gate_decision
from tasks.stages.models import (
    base_model_record,
    champion_record,
    champion_reward_record,
    champion_trained_on,
    registered_candidate,
)
from tasks.stages.register import RegistryRecord, register_task
from tasks.stages.summary import PipelineSummary, publish_summary
from tasks.stages.train import train_task
from tasks.trusted import check_deployment_run
from tasks.versioning import code_version


class RoundStopped(Exception):
    """Raised by :meth:`PipelineRound.stop`: the round ends early with a status (not an error)."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


class PipelineRound:
    """One round's MLflow parent run, stage timings and summary.

    Used as a context manager around the flow's steps. On leaving it the summary is published
    and the parent run is ended — FINISHED when the steps completed or a step stopped the round
    (:meth:`stop`), FAILED when one raised (the error propagates; every finished stage's
    outputs stay on disk and in the cache for the re-run). This is the only place a round ends.
    """

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.logger = get_run_logger()
        self.started = time.monotonic()
        self.rows: list[StageTiming] = []
        self.result: dict[str, Any] = {}
        experiment_id = tracking.configure(cfg.home, cfg.pipeline.name)
        flow_run_id = str(flow_run.get_id() or "")
        home = str(Path(cfg.home).resolve())
        self.rounds = RoundLog(data_dir(cfg))
        self.ledger = ledger_for(ingest_settings(cfg), data_dir(cfg))
        self._recover(self.rounds.load(), experiment_id, home)
        self.record, _ = self.rounds.begin(cfg.pipeline.name, flow_run_id=flow_run_id or None)
        self.parent = tracking.start_parent_run(
            experiment_id, run_name=f"{cfg.pipeline.name}-{flow_run.get_name() or 'run'}",
            tags={"prefect.flow_run_id": flow_run_id, "alignflow.config_digest": cfg.digest(),
                  "alignflow.code_version": code_version(), "alignflow.method": cfg.pipeline.method,
                  tracking.HOME_TAG: home, "alignflow.round_id": self.record.round_id})
        self.record.mlflow_run_id = self.parent
        self.rounds.save(self.record)
        self.summary = PipelineSummary(pipeline=cfg.pipeline.name, home=str(cfg.home), mlflow_run_id=self.parent,
                                       experiment_id=experiment_id, tracking_uri=tracking.tracking_uri(cfg.home),
                                       flow_run_id=flow_run_id)

    def timed(self, stage: str, status: str, started: float, metrics: dict[str, Any] | None = None) -> None:
        """Record a stage's row of the summary table (seconds since ``started``). A stage boundary:
        a SIGTERM whose exception was lost ends the run here (flows/termination.py)."""
        self.rows.append(StageTiming(stage=stage, status=status, seconds=time.monotonic() - started,
                                     metrics=metrics or {}))
        termination.raise_if_requested()

    def _recover(self, previous: RoundRecord | None, experiment_id: str, home: str) -> None:
        """Finish what the previous round on this home left: settle the files of a round that
        ended but died before settling them; close the MLflow runs (FAILED) and Prefect flow runs
        (CRASHED) of a round whose process died. Under the home lock, so that process is gone."""
        if previous is not None and previous.ended and not previous.settled and previous.state in SETTLES:
            self.ledger.settle(CONSUMED)
        closed = tracking.close_stale_runs(experiment_id, home)
        dead = {c["flow_run_id"] for c in closed if c["flow_run_id"]}
        if previous is not None and previous.interrupted and previous.flow_run_id:
            dead.add(previous.flow_run_id)
        crashed = close_dead_flow_runs(home, dead, keep=str(flow_run.get_id() or ""))  # + runs killed before a record
        if previous is not None and previous.interrupted:
            self.logger.warning("The previous round %s died at %r; this round redoes it (closed %d MLflow run(s) "
                                "as FAILED and %d Prefect flow run(s) as CRASHED).", previous.round_id,
                                previous.state, len(closed), len(crashed))
        elif crashed:
            self.logger.warning("Closed %d Prefect flow run(s) of processes that died on this home as CRASHED.",
                                len(crashed))

    def reached(self, state: str, **fields: Any) -> None:
        """Record a round state (tasks/round.py) where the next run can read it."""
        self.rounds.advance(self.record, state, **fields)
        fault_point(f"after:{state}")
        termination.raise_if_requested()

    def _end(self, exc_type: type[BaseException] | None, exc: BaseException | None) -> None:
        """Commit the round: its end state, then its landing files settled as consumed.
        A round that raised (not on its data) is ``failed``: its files stay pending for a retry."""
        if exc_type is None:
            end = "promoted" if self.summary.status == "promoted" else "rejected"
        elif issubclass(exc_type, RoundStopped):
            end = exc.status if exc.status in ENDS else "unchanged"  # type: ignore[union-attr]
        elif issubclass(exc_type, QuarantineThresholdExceeded):
            end = "failed-on-data"  # the ingest recorded its files as failed
        else:
            self.rounds.advance(self.record, FAILED, error=f"{exc_type.__name__}: {exc}"[:2000])
            return
        self.rounds.advance(self.record, end)
        fault_point("end")
        if end in SETTLES:
            self.ledger.settle(CONSUMED)
        self.rounds.settled(self.record)

    def stop(self, status: str, registry: RegistryRecord | None = None) -> None:
        """End the round here with ``status`` (``no-new-data``, ``unchanged``). Raises RoundStopped."""
        self.summary.status = status
        if registry is not None:
            self.summary.registry = registry
        raise RoundStopped(status)

    def __enter__(self) -> PipelineRound:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        status = "FAILED"
        try:
            self._end(exc_type, exc)
            if exc_type is None or issubclass(exc_type, RoundStopped):
                self.result = publish_summary(self.summary, self.rows, self.started)
                status = "FINISHED"
        finally:
            tracking.end_run(self.parent, status)
        return exc_type is not None and issubclass(exc_type, RoundStopped)


def resolve_config(config: PipelineConfig | str | None, overrides: list[str] | None) -> PipelineConfig:
    """The config as given (a :class:`PipelineConfig`, or a path; None: the embedded demo), with
    ``overrides`` applied. Raises ConfigError naming each bad field."""
    if isinstance(config, PipelineConfig):
        if not overrides:
            return config
        return validate_config(PipelineConfig, apply_overrides(config.model_dump(mode="json"), overrides))
    return load_pipeline_config(config, overrides)


@flow(name="alignment-pipeline", log_prints=True)
def alignment_pipeline(config: str | None = None, overrides: list[str] | None = None,
                       only_if_new_data: bool = False) -> dict[str, Any]:
    """Run one round of the pipeline.

    Args:
        config: path to a pipeline YAML; None runs the embedded demo (configs/demo.yaml).
        overrides: ``key.path=value`` strings applied on top of the file.
        only_if_new_data: return at once (status ``no-new-data``) when no new landing files
            arrived — what the scheduled deployment uses.

    Returns the run summary (stages, timings, metrics, registry state) as a dict.
    Raises the first stage error after marking the MLflow parent run FAILED; the quarantine
    and every finished stage's outputs stay on disk (and in the cache) for the re-run.
    A deployment run whose parameters set code-executing settings is refused (tasks/trusted.py).
    """
    if not isinstance(config, PipelineConfig):
        check_deployment_run(config, overrides)
    cfg = resolve_config(config, overrides)
    with termination.remembered(), FlowMarks(cfg.home).mark(flow_run.get_id(), "alignment-pipeline"), \
            home_lock(cfg.home, cfg.pipeline.lock_wait_s), PipelineRound(cfg) as rnd:
        record_config(rnd)
        base = starting_model(rnd)
        ingest = collect_feedback(rnd, base, only_if_new_data)
        rnd.reached("ingested", batch_id=ingest.batch_id, replayed_batches=ingest.replayed_batches)
        record_human_evaluation(rnd, ingest)
        dataset = build_dataset(rnd, ingest)
        rnd.reached("built", dataset_digest=dataset.digest)
        stop_if_champion_is_current(rnd, dataset)
        init = fine_tune_supervised(rnd, dataset, policy_start(rnd, base))
        reward = train_reward_model(rnd, dataset, base)
        candidate = update_policy(rnd, dataset, init, base, reward)
        rnd.reached("trained", candidate_digest=candidate.digest)
        stop_if_already_registered(rnd, candidate)
        champion = champion_record(cfg)
        decision = evaluate_and_gate(rnd, candidate, champion, base, reward, dataset)
        rnd.reached("evaluated")
        register_and_promote(rnd, candidate, reward, dataset, decision, champion)
        rnd.reached("registered", policy_version=rnd.summary.registry.policy_version)
        rnd.reached("gated", promoted=rnd.summary.registry.promoted)
    return rnd.result


# ----------------------------------------------------------------------------- steps


def record_config(rnd: PipelineRound) -> None:
    """Log the resolved config as params and as a YAML artifact of the parent run."""
    cfg = rnd.cfg
    tracking.log_params(rnd.parent, tracking.flatten(cfg.model_dump(mode="json")))
    config_file = saved_config_path(cfg.home, cfg.pipeline.name, cfg.digest())
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(to_yaml(cfg))
    tracking.log_artifact(rnd.parent, config_file, "config")


def starting_model(rnd: PipelineRound) -> ModelRecord:
    """The base model: the configured one, or the demo's own (built and cached once)."""
    t = time.monotonic()
    if rnd.cfg.demo is not None and rnd.cfg.model.policy is None:
        base = demo_base_model_task(rnd.cfg)
        rnd.timed("base model (demo)", "ready", t, {"path": base.path})
    else:
        base = base_model_record(rnd.cfg)
        rnd.timed("base model", "ready", t)
    return base


def collect_feedback(rnd: PipelineRound, base: ModelRecord, only_if_new_data: bool) -> IngestRecord:
    """(Demo: simulate a first batch into an empty landing folder.) Ingest and validate new files;
    with ``only_if_new_data``, stop the round when none arrived."""
    cfg = rnd.cfg
    if cfg.demo is not None:
        finish_simulated_landing(cfg)
        if landing_is_empty(cfg):
            t = time.monotonic()
            sim = simulate_feedback_task(cfg, champion_record(cfg) or base, base, round_index=0)
            rnd.timed("simulate feedback (demo)", "ran", t, sim)
    t = time.monotonic()
    ingest = ingest_task(cfg, rnd.parent)
    figures = {"new files": ingest.new_files, "rows in": ingest.rows_in, "valid": ingest.rows_valid,
               "quarantined": ingest.rows_quarantined}
    if ingest.replayed_batches:
        figures["replayed batches"] = len(ingest.replayed_batches)
    rnd.timed("ingest + validate", "ran", t, figures)
    if only_if_new_data and ingest.new_files == 0:
        rnd.logger.info("No new landing files: nothing to do.")
        rnd.stop("no-new-data")
    return ingest


def record_human_evaluation(rnd: PipelineRound, ingest: IngestRecord) -> None:
    """Returned human-evaluation sheets: win rates on their versions; under ``gate.judge: human``
    a version people preferred to the champion is promoted (tasks/evaluation/human.py)."""
    t = time.monotonic()
    summary = human_evaluation_step(rnd.cfg, ingest.validated_dir, rnd.parent)
    if summary:
        rnd.timed("human evaluation", "ran", t, summary)


def build_dataset(rnd: PipelineRound, ingest: IngestRecord) -> DatasetRecord:
    """The preference dataset (cached on the validated files and the ``preferences`` section)."""
    t = time.monotonic()
    dataset, cached = run_cached(build_task, dataset_present, cfg=rnd.cfg, ingest_record=ingest,
                                 parent_run_id=rnd.parent)
    rnd.timed("build preferences", "cached" if cached else "ran", t,
              {"pairs": dataset.num_pairs, "digest": dataset.digest})
    log_round_dataset(rnd.parent, rnd.cfg, dataset)
    return dataset


def stop_if_champion_is_current(rnd: PipelineRound, dataset: DatasetRecord) -> None:
    """Stop (``unchanged``) when the champion was trained on this dataset and config."""
    current = champion_trained_on(rnd.cfg, dataset.digest)
    if current is not None:
        rnd.logger.info("The champion v%s was trained on this dataset and config: nothing to retrain.",
                        current.policy_version)
        rnd.timed("train + evaluate", "skipped", time.monotonic(), {"champion": current.policy_version})
        rnd.stop("unchanged", registry=current)


def policy_start(rnd: PipelineRound, base: ModelRecord) -> ModelRecord:
    """The model the round's policy starts from: the base model, or the champion (``init_from``)."""
    if rnd.cfg.pipeline.init_from == "champion":
        return champion_record(rnd.cfg) or base
    return base


def _train(rnd: PipelineRound, stage: str, label: str, dataset: DatasetRecord, init: ModelRecord,
           figures: tuple[str, ...], **upstream: ModelRecord | None) -> ModelRecord:
    """Run (or take from cache) one training stage and record its row."""
    t = time.monotonic()
    record, cached = run_cached(train_task, ModelRecord.exists, cfg=rnd.cfg, stage=stage, data=dataset.files,
                                dataset_digest=dataset.digest, init=init, parent_run_id=rnd.parent, **upstream)
    rnd.timed(label, "cached" if cached else "ran", t, _final(record, *figures))
    return record


def fine_tune_supervised(rnd: PipelineRound, dataset: DatasetRecord, init: ModelRecord) -> ModelRecord:
    """SFT when ``sft.enabled`` (its output becomes the policy's start), else ``init``."""
    if not rnd.cfg.sft.enabled:
        return init
    return _train(rnd, "sft", "supervised fine-tune", dataset, init, ("eval/loss",))


def train_reward_model(rnd: PipelineRound, dataset: DatasetRecord, base: ModelRecord) -> ModelRecord | None:
    """The reward model, when enabled or when the method needs one; else None. With ``demo.offline``
    it starts from the demo's offline reward model (trained once on the offline preference set,
    cached) instead of the base model."""
    if not (rnd.cfg.reward.enabled or method(rnd.cfg.pipeline.method).needs_reward_model):
        return None
    t = time.monotonic()
    init = reward_start(rnd.cfg, base)
    if init is not base:
        extra = init.summary["extra_train"]
        rnd.timed("offline reward model (demo)", "cached" if init.summary["cached"] else "ran", t,
                  {"offline pairs": extra["pairs"], "digest": extra["digest"], "steps": init.summary["steps"]})
    return _train(rnd, "reward", "reward model", dataset, init, ("eval/accuracy",))


def update_policy(rnd: PipelineRound, dataset: DatasetRecord, init: ModelRecord, base: ModelRecord,
                  reward: ModelRecord | None) -> ModelRecord:
    """The candidate: the policy update of ``pipeline.method``."""
    name = rnd.cfg.pipeline.method
    anchored = method(name).implicit_reward and rnd.cfg.pipeline.dpo_reference == "base"
    shown = label(name, getattr(getattr(rnd.cfg, method(name).section), "loss_type", None))
    return _train(rnd, name, f"fine-tune ({shown})", dataset, init, ("eval/rewards/accuracy", "reward/raw"),
                  reward=reward, reference=base if anchored else None)


def stop_if_already_registered(rnd: PipelineRound, candidate: ModelRecord) -> None:
    """Stop (``unchanged``) when this exact candidate is already registered (a re-run)."""
    existing = registered_candidate(rnd.cfg, candidate)
    if existing is not None:
        rnd.timed("evaluate + gate", "cached", time.monotonic(), {"version": existing.policy_version})
        rnd.stop("unchanged", registry=existing)


def evaluate_and_gate(rnd: PipelineRound, candidate: ModelRecord, champion: ModelRecord | None,
                      base: ModelRecord, reward: ModelRecord | None, dataset: DatasetRecord) -> dict[str, Any]:
    """Evaluate the candidate (cached) and take the gate's decision. The reward model that scores and
    judges is the round's, or the champion's under ``gate.reward_judge: champion``."""
    t = time.monotonic()
    cfg, judge = rnd.cfg, reward
    if reward is not None and champion is not None and cfg.gate.reward_judge == "champion":
        judge = champion_reward_record(cfg, champion.registry_version) or reward
        if judge is not reward:
            rnd.logger.info("The champion's reward model v%s judges (gate.reward_judge): it never saw this "
                            "round's feedback.", judge.registry_version)
        else:  # e.g. a champion registered before reward versions were tagged with their policy's
            rnd.logger.warning("No reward model is registered with the champion v%s: the round's own judges.",
                               champion.registry_version)
            cfg = cfg.model_copy(update={"gate": cfg.gate.model_copy(update={"reward_judge": "round"})})
    report, cached = run_cached(evaluate_task, evaluation_complete, cfg=rnd.cfg, candidate=candidate, champion=champion,
                                base=base, reward=judge, dataset=dataset, parent_run_id=rnd.parent)
    rnd.timed("evaluate", "cached" if cached else "ran", t, report.headline())
    rnd.summary.evaluation = report.headline()
    tracking.log_metrics(rnd.parent, report.headline_metrics())  # the parent run's row shows them
    decision = gate_decision(cfg, report, has_champion=champion is not None)  # its reasons name the judge that judged
    if judge is not reward:  # the judge's record describes the champion's reward model: on the policy version
        decision["eval_tags"] |= {"alignflow.judge.reward_model": f"champion reward model v{judge.registry_version}",
                                  **{k.replace("alignflow.judge.", "alignflow.judge.champion_reward."): v
                                     for k, v in decision.pop("judge_tags").items()}}
    return await_people(rnd.cfg, decision)


def register_and_promote(rnd: PipelineRound, candidate: ModelRecord, reward: ModelRecord | None,
                         dataset: DatasetRecord, decision: dict[str, Any], champion: ModelRecord | None) -> None:
    """Register the candidate (and reward model), move ``challenger``, and ``champion`` if it passed."""
    t = time.monotonic()
    registry = register_task(rnd.cfg, candidate, reward, dataset.digest, decision, rnd.parent,
                             evaluated_against=champion.registry_version if champion else None)
    rnd.timed("register + promote", "ran", t, {"version": registry.policy_version, "promoted": registry.promoted})
    rnd.summary.registry = registry
    rnd.summary.status = "promoted" if registry.promoted else "not-promoted"


def _final(record: ModelRecord, *keys: str) -> dict[str, Any]:
    """Pick a few final metrics of a training record for the summary table."""
    metrics = record.summary.get("metrics", record.summary) if record.summary else {}
    out = {k: metrics[k] for k in keys if k in metrics}
    if "wall_s" in record.summary:
        out["train s"] = round(float(record.summary["wall_s"]), 1)
    return out
