import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from chatts_train.model.processor import ChatTSProcessor
from chatts_train.standins.checkpoint import make_tiny_checkpoint
from chatts_train.standins.synthetic import write_anomaly_dataset, write_datasets, write_series_task

torch.set_num_threads(2)


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true", help="also run the multi-process tests (minutes), as CI does")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts DeepSpeed processes (tens of seconds each); runs with --all")


def pytest_collection_modifyitems(config, items):
    """The default run is the fast one (single process, under a minute); `--all` adds the slow ones."""
    if config.getoption("--all"):
        return
    later = pytest.mark.skip(reason="multi-process: runs with --all (CI runs it)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(later)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny checkpoints of both releases: {"0801": path, "legacy": path}."""
    root = tmp_path_factory.mktemp("ckpt")
    return {rel: make_tiny_checkpoint(str(root / rel), rel) for rel in ("0801", "legacy")}


@pytest.fixture(scope="session")
def processors(tiny):
    return {rel: ChatTSProcessor.from_pretrained(path) for rel, path in tiny.items()}


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    return write_datasets(str(tmp_path_factory.mktemp("data")), {"gdsh": 6, "hbsn": 5, "whlj": 4, "zhlh": 5})


SCENARIOS = ("interrupted_and_resumed,plans,adapter_reproduces_engine,learns_from_series,fp16_loss_scaling,packed,robustness,"
             "training_mode_and_setup,loader_matches_transformers,loss_weighting")


@pytest.fixture(scope="session")
def results(tiny, tmp_path_factory):
    """One 2-process ZeRO-3 launch runs every scenario of dist_scenarios.py (each start costs tens of seconds)."""
    out = tmp_path_factory.mktemp("dist")
    write_series_task(str(out / "task.jsonl"), 48, length=120, seed=0)
    write_anomaly_dataset(str(out))  # anomaly.jsonl: the demo's task
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           os.path.join(os.path.dirname(__file__), "dist_scenarios.py"), str(out), tiny["0801"], SCENARIOS]
    proc = run_job(cmd, timeout=1200, env=env)
    path = out / "results.json"
    assert path.exists(), f"scenarios did not finish (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return read_json(path)


def start_job(cmd, **kw) -> subprocess.Popen:
    """A job that starts processes of its own (a launcher and its ranks), in a process group of its own so that
    finish_job can end all of it. Output is piped: stdout and stderr apart unless `stderr` says otherwise."""
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True, **kw)


def finish_job(job: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """The job's result. Past `timeout` seconds the job is killed with every process it started, and the test
    fails with its output. subprocess's own timeout kills the one process it started alone, and a rank left
    running can hold a core of CI's two (DeepSpeed's shared-memory set-up spins at 100% waiting for a peer,
    seen here), so that the tests after it crawl into their own timeouts. Tests give their jobs a few times
    what they take on 2 cores: a hang costs minutes, not the CI run's whole budget."""
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(job)
        out, err = job.communicate()
        pytest.fail(f"{' '.join(map(str, job.args[:6]))} ... still ran after {timeout} s: killed with its processes"
                    f"\n{(out or '')[-3000:]}\n{(err or '')[-3000:]}", pytrace=False)
    finally:
        kill_job(job)  # whatever of the job outlived it
    return subprocess.CompletedProcess(job.args, job.returncode, out, err)


def run_job(cmd, timeout: float, **kw) -> subprocess.CompletedProcess:
    return finish_job(start_job(cmd, **kw), timeout)


def kill_job(job: subprocess.Popen) -> None:
    """Every process of a job from start_job that still runs, killed."""
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return str(path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
