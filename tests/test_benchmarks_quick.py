"""Every benchmark's --quick mode (CPU, tiny shapes): the scripts run end to end, their
correctness checks pass, and they write their record to the given path, never over the GPU
results in benchmarks/results/. CPU, ~1 minute in all; no timing is asserted."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

# script -> (packages it needs beyond torch, metric keys its record must hold)
SCRIPTS = {
    "learner_step": (["diffusers"], ["speedup_vs_diffusers", "mfu", "loss_rel_diff", "equal_to_tolerance"]),
    "attention": ([], ["cases", "all_correct"]),
    "sampling": (["diffusers"], ["speedup_vs_pipeline", "samples_per_s", "checks"]),
    "weight_sync": ([], ["seconds", "runs"]),
    "memory": (["deepspeed"], ["rows", "model_state_gib_analytic"]),
    "grpo_fixed_prompts": ([], ["series", "sde_reward_per_update", "reward_gain_trained", "reward_gain_held_out"]),
    "grpo_cpu_costs": ([], ["episodes_speedup", "episode_tables_equal", "learner_speedup_vs_whole_batch"]),
}


def run_quick(name: str, out: Path | None, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BENCH / f"{name}.py"), "--quick", *extra] + (["--out", str(out)] if out else [])
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_quick_mode_runs_and_checks_pass(name, tmp_path):
    needs, keys = SCRIPTS[name]
    for pkg in needs:
        pytest.importorskip(pkg)
    out = tmp_path / f"{name}.json"
    proc = run_quick(name, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert {"command", "device", "date", "metrics"} <= record.keys()
    assert "--quick" in record["command"]
    for key in keys:
        assert key in record["metrics"], key
    m = record["metrics"]
    if name == "learner_step":
        assert m["equal_to_tolerance"] and m["compiled"] is not None  # the compiled path ran (aot_eager)
    if name == "sampling":
        assert m["checks"]["ok"]
    if name == "attention":
        assert m["all_correct"]
    if name == "weight_sync":
        assert all(r["verified"] for r in m["runs"])
    if name == "grpo_cpu_costs":  # episodes side by side reach the evaluation one at a time does
        assert m["episode_tables_equal"] and set(m["learner_speedup_vs_whole_batch"]) == {"micro_8"}
    if name == "grpo_fixed_prompts":  # evaluated before and after its one update, on both prompt sets
        assert [r["update"] for r in m["series"]] == [0, 1] and len(m["sde_reward_per_update"]) == 1
        assert all(0 <= r[k]["reward"] <= 1 for r in m["series"] for k in ("trained_ode", "held_out_ode"))


def test_quick_mode_never_replaces_gpu_results():
    """Without --out, --quick writes to the temp dir; the committed GPU record stays as it was."""
    result = BENCH / "results" / "attention.json"
    before = result.read_bytes() if result.exists() else None
    proc = run_quick("attention", None)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "attention_quick.json" in proc.stdout
    assert (result.read_bytes() if result.exists() else None) == before


def test_distributed_quick_runs_the_three_driver_configurations(tmp_path):
    """benchmarks/distributed.py gpu --quick: the 1-GPU, 2-GPU and pipelined driver runs on CPU
    (local Ray, tiny model), summarised into the distributed_gpu and e2e records (~1 min)."""
    pytest.importorskip("ray")
    out = tmp_path / "distributed_gpu.json"
    proc = subprocess.run([sys.executable, str(BENCH / "distributed.py"), "gpu", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())["metrics"]
    assert runs.pop("complete") is True
    assert set(runs) == {"one_gpu", "two_gpu", "two_gpu_pipelined"}
    for r in runs.values():
        assert r["iterations"] == 2 and r["samples_per_s"] > 0
        assert sum(r["stage_share"].values()) > 0.5  # the timed stages account for the iteration (overlap: > 1)
    e2e = json.loads((tmp_path / "e2e.json").read_text())["metrics"]
    assert e2e["two_gpu_speedup"] > 0 and e2e["gpu_busy_fraction"] is None  # no GPU on CPU


def test_scaling_quick_weak_scales_and_reports_efficiency(tmp_path):
    """benchmarks/scaling.py --quick --gpus 2,4: the layouts 1+1 and 2+2 (ZeRO-3, offload, pipelined)
    on CPU; the batch doubles with the rollout workers and the 2 -> 4 efficiency is computed (~2 min)."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "scaling.json"
    proc = subprocess.run([sys.executable, str(BENCH / "scaling.py"), "--quick", "--gpus", "2,4", "--iterations", "2",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads(out.read_text())["metrics"]
    two, four = m["runs"]["2"], m["runs"]["4"]
    assert (two["learners"], two["rollouts"], four["learners"], four["rollouts"]) == (1, 1, 2, 2)
    assert four["segments_per_iteration"] == 2 * two["segments_per_iteration"]  # weak scaling
    assert four["learner_tflop_per_update"] == pytest.approx(2 * two["learner_tflop_per_update"], rel=0.01)
    eff = m["scaling_efficiency"]["2->4"]
    assert eff == pytest.approx(four["samples_per_s"] / two["samples_per_s"] / 2, abs=1e-3)


def test_scaling_options_reach_the_driver_config():
    """--no-offload and --micro-batch change exactly the learner keys they name, and the resulting
    config still validates (the micro-batch divides the per-rank batch)."""
    sys.path.insert(0, str(BENCH))
    from scaling import overrides
    from spiral_rl.config import load_config

    base, changed = overrides(4, False, True), overrides(4, False, True, offload=False, micro_batch=16)
    diff = sorted(set(changed) - set(base))
    assert diff == ["cluster.micro_batch=16", "cluster.offload_optimizer=false"]
    cfg = load_config(changed)
    assert (cfg.cluster.offload_optimizer, cfg.cluster.micro_batch) == (False, 16) and cfg.cluster.learner_ranks == 2
    with pytest.raises(Exception, match="micro_batch"):  # 32 segments per rank: 24 does not divide them
        load_config(overrides(4, False, True, micro_batch=24))


def test_policy_improvement_bars_follow_the_before_and_after_evaluations():
    """benchmarks/distributed.py cpu and grpo_improvement.py turn a run's evaluations into the issue's
    figures; each bar is decided by the numbers (a hand-made run that clears all four, then one that
    clears none)."""
    sys.path.insert(0, str(BENCH))
    from distributed import improvement

    def evals(open_s, spiral_s, attempts, comp, fid):
        return {"open_loop": {"success_rate": open_s}, "spiral": {"success_rate": spiral_s, "attempts_per_step": attempts,
                                                                  "tasks": 16},
                "plan_only": {"action_completeness": comp, "physical_fidelity": fid}}
    good = improvement({"eval_before": evals(0.1, 0.2, 2.5, 0.60, 0.50), "iterations": 10, "minutes": 5.0,
                        "eval_after": evals(0.125, 0.25, 2.0, 0.72, 0.55)})
    assert good["one_shot_action_completeness_after"] == 0.72 and good["retries_per_subaction_before"] == 1.5
    assert (good["open_loop_success"], good["spiral_success_after"]) == (0.1, 0.25)
    assert all(good["bars_met"].values()), good
    bad = improvement({"eval_before": evals(0.2, 0.25, 2.0, 0.80, 0.50), "iterations": 10, "minutes": 5.0,
                       "eval_after": evals(0.2, 0.25, 2.1, 0.85, 0.45)})
    assert not any(bad["bars_met"].values()), bad


def test_sft_recipe_search_trains_scores_and_saves_a_loadable_model(tmp_path):
    """benchmarks/sft_recipe_search.py with a budget of 6 steps: it trains exactly that many, reports
    at half way and at the end, prints the critic's scores as JSON and writes a checkpoint that
    WorldModel.load reads (run from another directory). A budget that is neither seconds nor
    <N>steps is refused by name."""
    from spiral_rl.world_model import WorldModel

    script = str(BENCH / "sft_recipe_search.py")
    bad = subprocess.run([sys.executable, script, "smoke", "6stepz"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "BUDGET must be" in bad.stderr and "'6stepz'" in bad.stderr
    cmd = [sys.executable, script, "smoke", "6steps", str(ROOT / "configs" / "sft_ci.yaml"),
           "train.num_val_tasks=1", "train.num_train_tasks=4"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["step"] for r in rows] == [3, 6] and rows[-1]["run"] == "smoke"
    assert 0 <= rows[-1]["scores"]["physical_fidelity"] <= 1 and rows[-1]["scores"]["segments"] >= 1
    model = WorldModel.load(tmp_path / "runs" / "recipe" / "smoke" / "world_model.pt")
    assert model.num_frames == 8


def test_sft_recipe_search_pauses_and_resumes_to_the_same_weights(tmp_path):
    """--pause-after stops the run and saves its state; the same command resumes it and ends with
    the weights of one uninterrupted run, to float rounding (same steps, data order, noise, lr
    schedule). A different command under the same NAME is refused."""
    import torch

    script = str(BENCH / "sft_recipe_search.py")
    common = [str(ROOT / "configs" / "sft_ci.yaml"), "train.num_val_tasks=1", "train.num_train_tasks=4"]

    def run(name, *extra):
        proc = subprocess.run([sys.executable, script, name, "4steps", *extra, *common], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stdout + proc.stderr

    rc, out = run("whole")
    assert rc == 0, out[-3000:]
    rc, out = run("split", "--pause-after=1e-9")  # pauses after its first step
    assert rc == 0 and "paused at step 1" in out, out[-3000:]
    assert (tmp_path / "runs" / "recipe" / "split" / "state.pt").exists()
    rc, out_other = run("split", "train.lr=0.5")
    assert rc != 0 and "different command" in out_other, out_other[-3000:]
    rc, out = run("split")
    assert rc == 0 and "resumed" in out and "at step 1" in out, out[-3000:]
    assert not (tmp_path / "runs" / "recipe" / "split" / "state.pt").exists()
    whole, split = (torch.load(tmp_path / "runs" / "recipe" / n / "world_model.pt", weights_only=False)
                    for n in ("whole", "split"))
    # Not bitwise: two processes may round differently (a CI machine once differed by an ulp, which
    # Adam spreads). Measured on 2 Xeon cores: the same run with MKL_CBWR=AVX2 vs its default kernels
    # ends 8e-7 apart at most; a resume that drops the noise generator's state ends 1.2e-3 apart, one
    # that drops AdamW's moments 8e-4. 1e-5 sits between them. (assert_close also checks the keys.)
    torch.testing.assert_close(split["state_dict"], whole["state_dict"], rtol=0, atol=1e-5)
