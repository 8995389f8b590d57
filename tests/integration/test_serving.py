"""A registered policy served for real: ``mlflow models serve`` (the command the CLI prints and the
README gives) answers over HTTP on loopback; params change the output; plain and chat prompts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from datetime import datetime

import mlflow
import pytest

from tasks import tracking
from tasks.serving import serve_command
from tasks.serving.signature import POLICY_PARAMS
from tests.integration.pipeline_helpers import use_store
from tests.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CHAT = [{"role": "user", "content": "review the movie"}]
STARTUP_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny policy logged and promoted through the pipeline's own registry calls."""
    root = tmp_path_factory.mktemp("serving")
    folder = make_tiny_model(root / "policy", "gpt2")
    use_store(root)
    client = mlflow.MlflowClient()
    run = client.create_run(client.create_experiment("srv", artifact_location=(root / "artifacts").as_uri()))
    version = tracking.log_policy(run.info.run_id, folder, "srv", {"alignflow.method": "dpo"})
    client.set_terminated(run.info.run_id)
    tracking.promote("srv-policy", version)
    return root, f"sqlite:///{root}/mlflow.db", version


def test_logged_policy_has_a_params_signature_an_example_and_iso_times(registered, clean_mlflow_env):
    root, uri, version = registered
    use_store(root)
    info = mlflow.models.get_model_info("models:/srv-policy@champion")
    assert {p.name: p.default for p in info.signature.params.params} == POLICY_PARAMS
    assert info.saved_input_example_info is not None
    promoted_at = tracking.version_tags("srv-policy", version)[tracking.PROMOTED_AT]
    assert datetime.fromisoformat(promoted_at).utcoffset().total_seconds() == 0
    model = mlflow.pyfunc.load_model("models:/srv-policy@champion")
    short, long = (model.predict(["the movie", CHAT], params={"max_new_tokens": n}) for n in (2, 12))
    assert len(short) == len(long) == 2
    assert all(len(s.split()) < len(t.split()) for s, t in zip(short, long, strict=True))


def test_mlflow_models_serve_answers_over_http_and_honours_params(registered):
    root, uri, _ = registered
    port = _free_port()
    command = serve_command(uri, "srv-policy", port=port)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env["PATH"] = "/usr/bin:/bin"  # the venv is not on PATH, as in a fresh shell: the command must not need it
    log = (root / "serve.log").open("w")
    server = subprocess.Popen(["bash", "-c", command], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert server.poll() is None, (root / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as ping:
                    if ping.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (root / "serve.log").read_text()[-3000:]
            time.sleep(1)
        status, short = _post(port, {"inputs": ["the movie", CHAT], "params": {"max_new_tokens": 2}})
        assert status == 200, short
        status, long = _post(port, {"inputs": ["the movie", CHAT], "params": {"max_new_tokens": 12}})
        assert status == 200 and len(long["predictions"]) == 2
        assert all(len(s.split()) < len(t.split()) for s, t in zip(short["predictions"], long["predictions"],
                                                                   strict=True))
        sampled = [_post(port, {"inputs": ["the movie"], "params": {"max_new_tokens": 12, "temperature": 1.5,
                                                                     "seed": seed}})[1]["predictions"][0]
                   for seed in (1, 2, 1)]
        assert sampled[0] == sampled[2] != sampled[1]  # seeded sampling: reproducible, and the seed matters
        status, records = _post(port, {"dataframe_records": [{"prompt": "the movie"}, {"prompt": CHAT}],
                                       "params": {"max_new_tokens": 12}})
        assert status == 200 and records["predictions"] == long["predictions"], records
        status, error = _post(port, {"inputs": ["the movie"], "params": {"top_p": 0.0}})
        assert status == 400 and "top_p" in json.dumps(error)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()
