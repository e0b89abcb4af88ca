"""Every GPU benchmark's --quick mode (CPU, tiny shapes): the scripts run end to end, their
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


def test_quick_mode_never_replaces_gpu_results():
    """Without --out, --quick writes to the temp dir; the committed GPU record stays as it was."""
    result = BENCH / "results" / "attention.json"
    before = result.read_bytes() if result.exists() else None
    proc = run_quick("attention", None)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "attention_quick.json" in proc.stdout
    assert (result.read_bytes() if result.exists() else None) == before
