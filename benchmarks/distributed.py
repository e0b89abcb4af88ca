"""The distributed GRPO driver (launch/grpo.py on Ray actors) end to end, timed from its own output.

    python benchmarks/distributed.py cpu     # the README's main job (configs/grpo_tiny.yaml: local Ray,
                                             # CPU, 2 ZeRO-2 learner ranks) -> results/distributed_cpu.json
                                             # with its before/after evaluation and policy-improvement figures
    python benchmarks/distributed.py gpu     # a mid-size random-init model (preset small) on 1 GPU shared by
                                             # rollout and learner, then on 2 GPUs (learner and rollout each on
                                             # its own, NCCL weight sync), without and with one-step-off-policy
                                             # pipelining -> results/distributed_gpu.json and results/e2e.json
    python benchmarks/distributed.py gpu --quick   # the gpu path's logic on CPU (tiny model, seconds)

Each run is `launch/grpo.py` in a subprocess; figures come from its metrics.jsonl (segments, the
per-stage time split, each iteration's wall time) and, on GPU, from `nvidia-smi` sampled every
100 ms while the iterations run (utilization.gpu: the share of time a kernel was running). The
first iteration (actor warm-up, CUDA/cuDNN autotuning) is left out of the rates.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import checkpoint_id, cpu_name, write_record  # noqa: E402

class GPUSampler:
    """utilization.gpu of every GPU every 100 ms, with host timestamps, in a background thread."""

    def __init__(self):
        self.samples: list[tuple[float, int, float]] = []  # (time, gpu, utilization 0-100)
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits",
                                      "-lms", "100"], stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            gpu, util = line.strip().split(",")
            self.samples.append((time.time(), int(gpu), float(util)))

    def busy(self, t0: float, t1: float) -> dict[int, float]:
        """Mean utilization per GPU over [t0, t1], as a fraction."""
        per: dict[int, list[float]] = {}
        for t, gpu, util in self.samples:
            if t0 <= t <= t1:
                per.setdefault(gpu, []).append(util / 100)
        return {gpu: round(sum(v) / len(v), 3) for gpu, v in per.items()}

    def stop(self):
        self.proc.terminate()


def run_driver(name: str, args: list[str], out: Path, gpus: GPUSampler | None, iterations: int) -> dict:
    """Run launch/grpo.py, echo its output, and summarise its metrics.jsonl (iteration 1 left out)."""
    cmd = [sys.executable, "-u", str(ROOT / "launch" / "grpo.py"), *args, f"run.output_dir={out}",
           f"grpo.iterations={iterations}"]
    print(f"== {name}: {' '.join(cmd[2:])}", flush=True)
    t_start, marks = time.time(), {}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(line, end="", flush=True)
        if line.startswith(("[1/", f"[{iterations}/")):  # iteration 1 ends / the last one ends
            marks[line.split("/")[0]] = time.time()
    if proc.wait() != 0:
        raise SystemExit(f"{name}: launch/grpo.py exited with {proc.returncode}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    steady = rows[1:] or rows
    wall = sum(r["time/iteration"] for r in steady)
    names = [k[len("time/"):] for k in rows[0] if k.startswith("time/") and k != "time/iteration"]
    stage = {s: sum(r[f"time/{s}"] for r in steady) for s in names}  # the driver's stages, as it logs them
    res = {"iterations": len(rows), "segments_per_iteration": rows[0]["segments"],
           "samples_per_s": round(sum(r["segments"] for r in steady) / wall, 3),
           "iteration_s": round(wall / len(steady), 3),
           "stage_share": {s: round(v / wall, 3) for s, v in stage.items()},
           "learner_update_s": round(sum(r.get("loss/seconds", 0.0) for r in steady) / len(steady), 3),
           "sync_s": round(stage["sync"] / len(steady), 3),
           "reward_first": round(rows[0]["reward_mean"], 4), "reward_last": round(rows[-1]["reward_mean"], 4),
           "minutes": round((time.time() - t_start) / 60, 2),
           "eval_before": summary["before"], "eval_after": summary["after"]}
    peaks = [r["memory/learner_peak_gib"] for r in rows if "memory/learner_peak_gib" in r]
    if peaks:
        res["learner_peak_memory_gib"] = round(max(peaks), 2)
    if gpus is not None and "[1" in marks and f"[{iterations}" in marks:
        res["gpu_busy"] = gpus.busy(marks["[1"], marks[f"[{iterations}"])
    print(f"== {name}: {json.dumps({k: v for k, v in res.items() if not k.startswith('eval')})}", flush=True)
    return res


def improvement(res: dict) -> dict:
    """The policy-improvement figures of a run (its before/after evaluation on held-out val tasks)
    against the bars: SPIRAL succeeds on >= 1.5x as many tasks as open-loop; after GRPO one-shot
    (plan_only) completeness rises >= 0.10, attempts per sub-action fall, fidelity does not drop."""
    before, after = res["eval_before"], res["eval_after"]
    m = {"open_loop_success": before["open_loop"]["success_rate"], "spiral_success": before["spiral"]["success_rate"],
         "open_loop_success_after": after["open_loop"]["success_rate"],
         "spiral_success_after": after["spiral"]["success_rate"],
         "one_shot_action_completeness_before": before["plan_only"]["action_completeness"],
         "one_shot_action_completeness_after": after["plan_only"]["action_completeness"],
         "retries_per_subaction_before": before["spiral"]["attempts_per_step"] - 1,
         "retries_per_subaction_after": after["spiral"]["attempts_per_step"] - 1,
         "physical_fidelity_before": before["plan_only"]["physical_fidelity"],
         "physical_fidelity_after": after["plan_only"]["physical_fidelity"],
         "iterations": res["iterations"], "minutes": res["minutes"], "eval_tasks": after["spiral"]["tasks"]}
    m = {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
    loop_gain = lambda spiral, open_: spiral > 0 and spiral >= 1.5 * open_  # noqa: E731
    m["bars_met"] = {
        # the loop's own worth, on the checkpoint GRPO starts from and on the one it ends with
        "spiral_vs_open_loop_1.5x": loop_gain(m["spiral_success"], m["open_loop_success"]),
        "spiral_vs_open_loop_1.5x_after": loop_gain(m["spiral_success_after"], m["open_loop_success_after"]),
        "one_shot_completeness_+0.10": m["one_shot_action_completeness_after"] - m["one_shot_action_completeness_before"] >= 0.10,
        "retries_fall": m["retries_per_subaction_after"] < m["retries_per_subaction_before"],
        "fidelity_not_lower": m["physical_fidelity_after"] >= m["physical_fidelity_before"]}
    return m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("where", choices=("cpu", "gpu"))
    ap.add_argument("--quick", action="store_true", help="the gpu path on CPU with a tiny model (logic only)")
    ap.add_argument("--iterations", type=int, default=0, help="0: the config's (cpu) / 6 (gpu)")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/<name>.json)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="spiral_dist_"))

    if args.where == "cpu":
        res = run_driver("embedded default", [str(ROOT / "configs" / "grpo_tiny.yaml")], tmp / "cpu", None,
                         args.iterations or 10)
        device = f"{cpu_name()}, {os.cpu_count()} cores (local Ray, gloo)"
        from spiral_rl.config import load_config

        ckpt = load_config([str(ROOT / "configs" / "grpo_tiny.yaml")]).model.pretrained_path
        config = {"config": "configs/grpo_tiny.yaml", **checkpoint_id(ckpt, ROOT)}
        res["policy_improvement"] = improvement(res)  # the bars come from grpo_improvement.py
        print("policy improvement:", json.dumps(res["policy_improvement"]), flush=True)
        write_record("distributed_cpu", device, config, res, args.quick, args.out)
        return 0

    import torch  # noqa: E402 (only the gpu path builds a model)
    from spiral_rl.config import load_config  # noqa: E402
    from spiral_rl.world_model import WorldModel  # noqa: E402
    gpu = torch.cuda.is_available() and not args.quick
    if not gpu and not args.quick:
        raise SystemExit("no CUDA device: run `gpu --quick` for the logic on CPU")
    preset = "small" if gpu else "tiny"
    torch.manual_seed(0)
    WorldModel.from_config(load_config([f"model.preset={preset}"])).save(tmp / "init" / "world_model.pt")
    common = [f"model.preset={preset}", f"model.pretrained_path={tmp / 'init'}", "model.sample_steps=10",
              "grpo.prompts_per_iter=8", "grpo.group_size=8", "grpo.episodes_per_iter=4", "grpo.sample_steps=10",
              "grpo.train_steps=4", "grpo.eval_tasks=2", "grpo.eval_every=0", "grpo.checkpoint_every=0",
              "loop.max_retries=1", "cluster.learner_ranks=1", "cluster.critic_servers=2", "cluster.critic_cpus=2",
              "cluster.rollout_cpus=2", "cluster.learner_cpus=2", "cluster.micro_batch=8"]
    if args.quick:
        common += ["grpo.prompts_per_iter=2", "grpo.group_size=2", "grpo.episodes_per_iter=1", "grpo.sample_steps=3",
                   "model.sample_steps=3", "grpo.train_steps=1", "grpo.eval_tasks=1", "cluster.critic_servers=1",
                   "cluster.critic_cpus=0.5", "cluster.rollout_cpus=1", "cluster.learner_cpus=1", "cluster.micro_batch=2"]
    g = (lambda share: [f"cluster.learner_gpus={share}", f"cluster.rollout_gpus={share}"]) if gpu else (lambda share: [])
    runs = {"one_gpu": g(0.5), "two_gpu": g(1), "two_gpu_pipelined": [*g(1), "grpo.pipeline=true"]}
    sampler = GPUSampler() if gpu else None
    iters = args.iterations or (6 if gpu else 2)
    device = torch.cuda.get_device_name(0) if gpu else "CPU (--quick: logic only)"
    config = {"preset": preset, "common_overrides": common, "runs": runs}
    res: dict = {}
    try:
        for name, extra in runs.items():
            res[name] = run_driver(name, common + extra, tmp / name, sampler, iters)
            # written after every configuration: a run cut short (time or device budget) keeps what it measured
            write_record("distributed_gpu", device, config, {**res, "complete": len(res) == len(runs)},
                         args.quick, args.out)
    finally:
        if sampler:
            sampler.stop()
    one, two = res["one_gpu"], res["two_gpu_pipelined"]
    e2e = {"gpu_busy_fraction": (one.get("gpu_busy") or {}).get(0),
           "two_gpu_speedup": round(two["samples_per_s"] / one["samples_per_s"], 3),
           "two_gpu_unpipelined_speedup": round(res["two_gpu"]["samples_per_s"] / one["samples_per_s"], 3),
           "one_gpu_samples_per_s": one["samples_per_s"], "two_gpu_samples_per_s": two["samples_per_s"],
           "one_gpu_stage_share": one["stage_share"], "two_gpu_gpu_busy": two.get("gpu_busy")}
    print("e2e:", json.dumps(e2e), flush=True)
    write_record("e2e", device, config, e2e, args.quick, None if not args.out else str(Path(args.out).with_name("e2e.json")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
