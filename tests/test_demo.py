"""The closed-loop demo (launch/demo.py, the scripted stand-in generator) end to end (CPU)."""
import json
import sys
from pathlib import Path

import imageio.v2 as imageio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
import demo  # noqa: E402


def test_demo_writes_videos_and_records_and_the_critic_catches_injected_flaws(tmp_path):
    assert demo.main([f"run.output_dir={tmp_path}", "run.num_tasks=12", "loop.max_retries=3"]) == 0
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("val-*.json"))]
    assert len(records) == 12 and (tmp_path / "config.yaml").exists()
    attempts = [a for r in records for s in r["steps"] for a in s["attempts"]]
    flawed = [a for a in attempts if a["injected_flaw"]]
    clean = [a for a in attempts if not a["injected_flaw"]]
    assert len(flawed) >= 10 and len(clean) >= 10
    assert sum(a["decision"] == "refine" for a in flawed) / len(flawed) >= 0.9
    assert sum(a["decision"] != "refine" for a in clean) / len(clean) >= 0.9
    # retries happen only after a refine verdict, and a task fails only if a step never passed
    for r in records:
        for s in r["steps"]:
            assert all(a["decision"] == "refine" for a in s["attempts"][:-1])
        committed = [s["attempts"][s["committed"]]["decision"] for s in r["steps"]]
        assert not r["success"] or (not r["aborted"] and "refine" not in committed)
    video = imageio.mimread(tmp_path / "val-0.gif")
    n_steps = len(records[0]["steps"])
    assert len(video) == 1 + n_steps * 8  # first frame + one committed segment per step
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tasks"] == 12 and summary["success"] >= 9
