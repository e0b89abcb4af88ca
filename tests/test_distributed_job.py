"""The distributed driver as users run it (CPU, ~2 min on 2 cores): a local two-node cluster from
`ray start --head` and `ray start --address` (two raylets on this box, each with its own temp dir
and ports, stopped in a finally), then
`ray job submit --working-dir . -- python3 launch/grpo.py configs/grpo_ray_ci.yaml ...`: 1 rollout
worker, 2 critic servers, 2 ZeRO-2 learner ranks on gloo. The job must finish SUCCEEDED and write
metrics, TensorBoard events, a DeepSpeed checkpoint per iteration and the post-trained weights;
a second job resumes it from its latest checkpoint with `grpo.resume=true`."""
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from spiral_rl.config import load_config
from spiral_rl.world_model import WorldModel

ROOT = Path(__file__).resolve().parents[1]
RAY = str(ROOT / ".venv" / "bin" / "ray") if (ROOT / ".venv" / "bin" / "ray").exists() else "ray"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_node(env: dict, cpus: int, *args: str) -> tuple[subprocess.Popen, Path]:
    """`ray start --block` in its own session, with its own temp dir and free ports -> (process, log)."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    agent, agent_grpc, runtime_env, node, objects, metrics = free_ports(6)
    cmd = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
           f"--node-manager-port={node}", f"--object-manager-port={objects}", f"--metrics-export-port={metrics}",
           f"--num-cpus={cpus}", f"--temp-dir={temp}", "--disable-usage-stats", *args]
    return subprocess.Popen(cmd, env=env, stdout=open(temp / "node.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True), temp / "node.log"


def stop_node(proc: subprocess.Popen) -> None:
    """SIGTERM stops what `ray start --block` started; stragglers of its session are ended by id."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    left = subprocess.run(["ps", "-o", "pid=", "--sid", str(proc.pid)], capture_output=True, text=True).stdout
    for pid in map(int, left.split()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def cluster():
    """A two-node Ray cluster of our own: a head with 4 CPUs and a worker node with 2 joined to it.
    Jobs run on the head (`ray job submit`); placement decides where the actors go."""
    gcs, dash, client = free_ports(3)
    env = dict(os.environ, PATH=f"{Path(RAY).parent}{os.pathsep}{os.environ['PATH']}",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", RAY_AUTH_MODE="disabled",  # "0" refuses a second node
               GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")  # one box: loopback (DESIGN.md section 7)
    env.pop("RAY_ADDRESS", None)
    head, head_log = start_node(env, 4, "--head", f"--port={gcs}", "--include-dashboard=true",
                                "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                                f"--ray-client-server-port={client}")
    nodes, address = [head], f"http://127.0.0.1:{dash}"
    try:
        for _ in range(120):
            if subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode == 0:
                break
            assert head.poll() is None, head_log.read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail("the Ray head did not come up in 120 s")
        worker, worker_log = start_node(env, 2, f"--address=127.0.0.1:{gcs}")
        nodes.append(worker)
        for _ in range(120):
            status = subprocess.run([RAY, "status", f"--address=127.0.0.1:{gcs}"], env=env, capture_output=True, text=True)
            if status.stdout.count("node_") >= 2:
                break
            assert worker.poll() is None, worker_log.read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail(f"the worker node did not join in 120 s:\n{status.stdout}")
        yield address, env
    finally:
        for proc in reversed(nodes):
            stop_node(proc)


def submit(address: str, env: dict, *args: str) -> tuple[bool, str]:
    """ray job submit (blocking) -> (whether `ray job status` says SUCCEEDED, status + logs)."""
    sid = f"grpo-{time.time_ns()}"
    subprocess.run([RAY, "job", "submit", "--address", address, "--submission-id", sid, "--working-dir", ".",
                    "--", "python3", "launch/grpo.py", "configs/grpo_ray_ci.yaml", *args],
                   cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    status = subprocess.run([RAY, "job", "status", "--address", address, sid], env=env, capture_output=True, text=True)
    logs = subprocess.run([RAY, "job", "logs", "--address", address, sid], env=env, capture_output=True, text=True)
    out = status.stdout + status.stderr
    # the CLI prints this line exactly when the job's JobStatus is SUCCEEDED
    return f"Job '{sid}' succeeded" in out, out + logs.stdout


def test_ray_job_submit_trains_checkpoints_and_resumes(cluster, tmp_path):
    address, env = cluster
    torch.manual_seed(0)
    WorldModel.from_config(load_config([])).save(tmp_path / "init" / "world_model.pt")
    out = tmp_path / "run"
    common = (f"model.pretrained_path={tmp_path / 'init'}", f"run.output_dir={out}")

    succeeded, logs = submit(address, env, *common)
    assert succeeded, logs[-5000:]
    assert "2 learner rank(s) on cpu (ZeRO-2, gloo" in logs and "verified on every rollout worker" in logs
    assert "placement pack over 1 node(s)" in logs  # the head has the CPUs for every actor
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        assert r["segments"] == 6 and {f"time/{s}" for s in ("rollout", "sample", "critic", "replay", "learner", "sync")} <= set(r)
        if "loss/first_ratio_max_dev" in r:
            assert r["loss/first_ratio_max_dev"] < 1e-3
    assert list((out / "tb").glob("events.out.tfevents.*"))
    ckpt = out / "checkpoints"
    assert json.loads((ckpt / "latest.json").read_text()) == {"iteration": 2, "tag": "iter000002"}
    assert (ckpt / "learner" / "latest").read_text().strip() == "iter000002"  # DeepSpeed's own pointer
    assert sorted(p.name for p in (ckpt / "learner").glob("iter*")) == ["iter000001", "iter000002"]
    assert len(list((ckpt / "learner" / "iter000002").glob("zero_pp_rank_*_optim_states.pt"))) == 2  # 2 ranks
    assert json.loads((out / "summary.json").read_text())["replay"]["records"] == 12
    WorldModel.load(out / "world_model.pt")

    succeeded, logs = submit(address, env, *common, "grpo.resume=true", "grpo.iterations=3")
    assert succeeded, logs[-5000:]
    assert "at iteration 2" in logs
    assert [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((ckpt / "latest.json").read_text())["tag"] == "iter000003"
    assert sorted(p.name for p in (ckpt / "learner").glob("iter*")) == ["iter000002", "iter000003"]  # newest 2 kept


def test_pipelined_job_spread_over_two_nodes_trains_one_update_off_policy(cluster, tmp_path):
    """grpo.pipeline=true: iteration n+1's rollouts overlap iteration n's learner step, so every
    batch after the first was sampled one update behind the learner (policy_lag 1), the update
    runs with the ratio correcting that lag, and the run finishes as the on-policy one does.
    cluster.placement=spread puts the actors on both nodes: the learner group's process group,
    the weight sync and the critic calls then cross raylets as they cross hosts on a cluster."""
    address, env = cluster
    torch.manual_seed(0)
    WorldModel.from_config(load_config([])).save(tmp_path / "init" / "world_model.pt")
    out = tmp_path / "run"
    succeeded, logs = submit(address, env, f"model.pretrained_path={tmp_path / 'init'}", f"run.output_dir={out}",
                             "grpo.pipeline=true", "grpo.iterations=3", "grpo.checkpoint_every=0",
                             "cluster.placement=spread")
    assert succeeded, logs[-5000:]
    assert "placement spread over 2 node(s)" in logs and "verified on every rollout worker" in logs
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert [r["policy_lag"] for r in rows] == [0, 1, 1]
    if "loss/first_ratio_max_dev" in rows[0]:
        assert rows[0]["loss/first_ratio_max_dev"] < 1e-3  # on-policy: checked to be 1
    assert json.loads((out / "summary.json").read_text())["replay"]["records"] == 18
    WorldModel.load(out / "world_model.pt")
