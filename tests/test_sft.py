"""launch/sft.py end to end: a local Ray cluster, one Ray Train worker, DeepSpeed ZeRO-2 on CPU
with gloo, configs/sft_ci.yaml. Runs the driver as a subprocess, exactly as a user would
(~30 s on 2 CPU cores, plus ~25 s for the resume test; the first DeepSpeed init on a fresh
machine JIT-compiles an op, ~40 s more, cached afterwards)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spiral_rl.config import load_config
from spiral_rl.world.dataset import SegmentDataset
from spiral_rl.world_model import WorldModel

ROOT = Path(__file__).resolve().parents[1]


def sft(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "launch/sft.py", "configs/sft_ci.yaml", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"sft.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    proc = sft(f"run.output_dir={out}")
    assert "done in" in proc.stdout
    log = proc.stdout + proc.stderr  # progress: loss, lr, throughput and the training time left
    assert re.search(r"step 5/30 loss \d\.\d{4} lr \S+ samples/s [\d.]+ eta [\d.]+ min", log), log[-3000:]
    assert re.search(r"step 30/30 loss .* eta 0\.0 min", log), log[-3000:]
    return out


def test_sft_trains_checkpoints_exports_and_evaluates(run_dir):
    cfg = load_config([str(ROOT / "configs" / "sft_ci.yaml")])
    checkpoints = sorted((run_dir / "ray" / "sft").glob("checkpoint_step*"))
    assert [c.name for c in checkpoints] == ["checkpoint_step0000015", "checkpoint_step0000030"]
    assert (checkpoints[-1] / "latest").read_text().strip() == "step30"  # DeepSpeed's own pointer
    assert (run_dir / "config.yaml").is_file()

    record = json.loads((run_dir / "eval.json").read_text())
    assert record["steps"] == cfg.train.steps
    assert record["val_loss"]["end"] < 0.9 * record["val_loss"]["start"]  # fixed-noise val loss fell
    assert record["train_loss"]["last"] < record["train_loss"]["first"]
    assert [r["step"] for r in record["history"]["train"]] == list(range(5, 31, 5))
    assert [r["step"] for r in record["history"]["val"]] == [0, 20, 30]  # start, eval_every, end
    for scores in (record["scores"], record["ground_truth"]):
        assert scores["segments"] == record["segments"] > 0
        assert all(0.0 <= scores[d] <= 1.0 for d in ("action_completeness", "physical_fidelity",
                                                       "temporal_consistency", "visual_quality"))
    assert record["ground_truth"]["action_completeness"] == 1.0  # the critic's ceiling on real frames
    rows = record["history"]["train"]
    assert record["train_minutes"] == round(sum(r["seconds"] for r in rows) / 60, 2) > 0
    assert len(record["devices"]) == 1 and record["devices"][0].startswith("1 x ")

    model = WorldModel.load(run_dir)  # the exported fp32 weights load and generate
    example = SegmentDataset(cfg.world, "val", 1)[0]
    frames = model.generate(example.context[None], [example.sub_action.text], seed=0)
    assert frames.shape == (1, cfg.world.segment_frames, cfg.world.frame_size, cfg.world.frame_size, 3)
    assert frames.dtype == np.uint8


def test_sft_starts_a_new_run_from_a_copied_checkpoint(run_dir, tmp_path):
    """train.resume_from: a new run directory from another run's checkpoint_step15/ (copied, as
    from another machine), paused at step 20 and resumed, reaches the same step-30 weights as the
    uninterrupted run."""
    copy = tmp_path / "copied_checkpoint"
    shutil.copytree(run_dir / "ray" / "sft" / "checkpoint_step0000015", copy)
    bad = subprocess.run([sys.executable, "launch/sft.py", "configs/sft_ci.yaml", f"run.output_dir={tmp_path / 'x'}",
                          f"train.resume_from={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "train.resume_from" in bad.stderr and "latest" in bad.stderr, bad.stderr[-2000:]
    # train.pause_after: stop at step 20 as if it were the end (its evaluation and world_model.pt),
    # the lr schedule still that of 30 steps; then train.resume=true goes on to the end.
    proc = sft(f"run.output_dir={tmp_path / 'b'}", f"train.resume_from={copy}", "train.pause_after=20")
    assert "at step 15" in proc.stdout + proc.stderr and "paused after step 20 of 30" in proc.stdout
    paused = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert paused["steps"] == 20 and paused["history"]["train"][-1]["step"] == 20
    assert (tmp_path / "b" / "ray" / "sft" / "checkpoint_step0000020").is_dir()
    again = subprocess.run([sys.executable, "launch/sft.py", "configs/sft_ci.yaml", f"run.output_dir={tmp_path / 'b'}",
                            "train.resume=true", "train.pause_after=20"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode != 0 and "already at step 20" in again.stderr, again.stderr[-2000:]
    proc = sft(f"run.output_dir={tmp_path / 'b'}", "train.resume=true")
    assert "at step 20" in proc.stdout + proc.stderr
    record = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert [r["step"] for r in record["history"]["train"]] == list(range(5, 31, 5))  # the old rows kept
    resumed, uninterrupted = WorldModel.load(tmp_path / "b"), WorldModel.load(run_dir)
    for (name, a), (_, b) in zip(resumed.state_dict().items(), uninterrupted.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_sft_refuses_to_overwrite_and_resumes(run_dir):
    proc = subprocess.run([sys.executable, "launch/sft.py", "configs/sft_ci.yaml", f"run.output_dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "train.resume=true" in proc.stderr
    proc = sft(f"run.output_dir={run_dir}", "train.resume=true", "train.steps=35")
    assert "at step 30" in proc.stdout + proc.stderr
    record = json.loads((run_dir / "eval.json").read_text())
    assert record["steps"] == 35 and record["history"]["train"][-1]["step"] == 35
    assert (run_dir / "ray" / "sft" / "checkpoint_step0000035").is_dir()
    assert len(record["devices"]) == 1  # resumed on the same device: listed once
    assert record["train_minutes"] == round(sum(r["seconds"] for r in record["history"]["train"]) / 60, 2)


def test_training_seconds_sums_every_launch_and_reads_old_rows():
    """Rows with their own seconds are summed as they are; rows written before that field existed
    give theirs back from throughput x steps since the previous row (a resumed run mixes both)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("sft_driver", ROOT / "launch" / "sft.py")
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    history = {"train": [{"step": 50, "samples_per_s": 20.0}, {"step": 100, "samples_per_s": 16.0},
                         {"step": 150, "samples_per_s": 99.0, "seconds": 7.5}]}
    assert driver.training_seconds(history, 16) == 50 * 16 / 20 + 50 * 16 / 16 + 7.5


def test_sft_quality_scores_a_run_and_reports_its_training(run_dir, tmp_path):
    """benchmarks/sft_quality.py on a launch/sft.py output: the critic's scores, the issue's bar,
    and the run's training minutes and devices from its eval.json, written where --out says."""
    out = tmp_path / "quality.json"
    proc = subprocess.run([sys.executable, "benchmarks/sft_quality.py", str(run_dir / "world_model.pt"),
                           f"--out={out}", "train.num_val_tasks=1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record, run = json.loads(out.read_text()), json.loads((run_dir / "eval.json").read_text())
    m = record["metrics"]
    assert m["training"]["minutes"] == run["train_minutes"] > 0 and m["training"]["steps"] == run["steps"]
    assert run["devices"][0] in record["device"]
    assert m["bar_met"] == (m["scores"]["action_completeness"] >= 0.6 and m["scores"]["physical_fidelity"] >= 0.8)
    assert m["scores"]["segments"] >= 1 and sum(v["segments"] for v in m["by_verb"].values()) == m["scores"]["segments"]


def test_export_turns_any_checkpoint_into_the_run_s_weights(run_dir, tmp_path):
    """launch/export.py on the CI run's ZeRO-2 checkpoints: the newest gives exactly the weights
    launch/sft.py exported at the end (DeepSpeed's zero_to_fp32 assembles the fp32 masters); the
    older one gives its own step's record. (A ZeRO-0 checkpoint of the CPU pre-training run
    exported at steps 24000 and 30000 scored exactly what that run's own evaluations did: RESULTS
    section 8.) Whichever tests ran before (one resumes the run to step 35), the run keeps two."""
    def export(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "launch/export.py", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
    older, newest = sorted((run_dir / "ray" / "sft").glob("checkpoint_step*"))
    step = int(older.name.removeprefix("checkpoint_step"))
    run = json.loads((run_dir / "eval.json").read_text())
    proc = export(str(newest), f"--out={tmp_path / 'last'}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    exported, final = WorldModel.load(tmp_path / "last"), WorldModel.load(run_dir)
    for (name, a), (_, b) in zip(exported.state_dict().items(), final.state_dict().items()):
        assert torch.equal(a, b), name
    record = json.loads((tmp_path / "last" / "eval.json").read_text())
    assert record["steps"] == record["scores_step"] == run["steps"] and record["scores"] == run["scores"]

    proc = export(str(older))  # default --out: beside the run's ray/
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    mid = run_dir / f"export_step{step:07d}"
    record = json.loads((mid / "eval.json").read_text())
    assert record["steps"] == step and record["history"]["train"][-1]["step"] == step
    assert record["scores_step"] == max(v["step"] for v in run["history"]["val"] if v["step"] <= step)
    assert any(not torch.equal(a, b) for a, b in zip(WorldModel.load(mid).state_dict().values(),
                                                      final.state_dict().values()))

    bad = export(str(tmp_path))
    assert bad.returncode != 0 and "latest" in bad.stderr
    copied = tmp_path / "copied" / "a" / "b" / "c"
    shutil.copytree(older, copied)
    bad = export(str(copied))  # copied away from its run: no config.yaml above it
    assert bad.returncode != 0 and "--config=" in bad.stderr
