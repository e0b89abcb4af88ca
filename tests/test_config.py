"""Config: defaults, composition order, save/reload, and load-time errors that name the key."""
import dataclasses
import json
from pathlib import Path

import pytest

from spiral_rl.config import ConfigError, Config, ScoreDims, config_to_dict, load_config, save_config, validate
from spiral_rl.rollout import grpo_batch_plan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_yaml(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------- good configs


def test_defaults_load():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg == load_config([]) == Config()
    assert cfg.world.frame_size == 32 and cfg.model.patch_size == 4
    assert cfg.world.heldout_compositions == ["jump:triangle", "push:circle"]
    # ScoreDims is shared, but thresholds and weights have their own defaults.
    assert cfg.critic.thresholds == ScoreDims(0.8, 0.8, 0.8, 0.6)
    assert cfg.reward.weights == ScoreDims(0.5, 0.25, 0.15, 0.1)
    assert cfg.critic.thresholds is not Config().critic.thresholds  # no shared mutable default


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads_and_names_a_checkpoint_that_exists(name):
    """A README command must not fail on its config: each loads, validates, and any checkpoint it
    names is in the repository (configs/grpo_improve.yaml -> checkpoints/tiny_sft_noisy.pt)."""
    cfg = load_config([str(CONFIGS / name)])
    if cfg.model.pretrained_path:
        assert (CONFIGS.parent / cfg.model.pretrained_path).is_file(), cfg.model.pretrained_path


def test_default_yaml_equals_structured_defaults():
    assert load_config([str(CONFIGS / "default.yaml")]) == Config()


def test_tiny_overlay():
    cfg = load_config([str(CONFIGS / "tiny.yaml")])
    assert cfg.world.segment_frames == 6 and cfg.run.num_tasks == 2
    assert cfg.world.frame_size == 32  # untouched keys keep their defaults


def test_train_section_and_bf16_values():
    cfg = load_config(["train.bf16=true", "train.zero_stage=3", "model.guidance=2.5"])
    assert cfg.train.bf16 is True and cfg.train.zero_stage == 3 and cfg.model.guidance == 2.5
    assert load_config(["train.bf16=false"]).train.bf16 is False
    assert load_config([]).train.bf16 == "auto"


def test_grpo_batch_plan_and_cluster_rules():
    plan = grpo_batch_plan(load_config(["cluster.micro_batch=4", "grpo.window=4", "grpo.train_steps=2"]))
    assert plan == {"prompts_per_iter": 8, "group_size": 4, "segments_per_learner_step": 32, "learner_ranks": 2,
                    "per_rank_batch": 16, "micro_batch": 4, "micro_batches_per_rank": 4, "sde_window_steps": 4,
                    "trained_steps_per_update": 2, "grad_accumulation": 8, "updates_per_iter": 1}
    # the per-rank rules apply to the distributed learner only
    local = load_config(["cluster.mode=local", "grpo.prompts_per_iter=3", "grpo.group_size=3"])
    assert grpo_batch_plan(local)["per_rank_batch"] == 9 and grpo_batch_plan(local)["learner_ranks"] == 1
    sliced = grpo_batch_plan(load_config(["cluster.mode=local", "cluster.micro_batch=8", "grpo.window=2"]))
    assert (sliced["micro_batch"], sliced["micro_batches_per_rank"], sliced["grad_accumulation"]) == (8, 4, 8)
    with pytest.raises(ConfigError, match="cluster.micro_batch=5 must divide the learner batch"):
        load_config(["cluster.mode=local", "cluster.micro_batch=5"])
    ci = load_config([str(CONFIGS / "grpo_ci.yaml")]), load_config([str(CONFIGS / "grpo_ray_ci.yaml")])
    assert ci[0].cluster.mode == "local" and ci[1].cluster.mode == "ray" and ci[0].grpo == ci[1].grpo.__class__(
        **{**dataclasses.asdict(ci[1].grpo), "checkpoint_every": ci[0].grpo.checkpoint_every})


def test_sft_ci_overlay():
    cfg = load_config([str(CONFIGS / "sft_ci.yaml")])
    assert cfg.train.steps < Config().train.steps and cfg.train.use_gpu is False


def test_yaml_files_then_overrides_compose_in_order(tmp_path):
    a = write_yaml(tmp_path, "a.yaml", "world:\n  frame_size: 64\n  seed: 1\n")
    b = write_yaml(tmp_path, "b.yml", "world:\n  frame_size: 16\n")
    cfg = load_config([a, b])
    assert (cfg.world.frame_size, cfg.world.seed) == (16, 1)  # later file wins, merge is deep
    # Overrides come after all files, wherever they stand on the command line.
    cfg = load_config(["world.frame_size=48", a, b, "reward.weights.visual_quality=0"])
    assert cfg.world.frame_size == 48
    assert cfg.reward.weights.visual_quality == 0.0 and isinstance(cfg.reward.weights.visual_quality, float)
    assert cfg.reward.weights.action_completeness == 0.5


def test_override_values_are_parsed():
    cfg = load_config(["world.heldout_compositions=[swap:square]", "planner.kind=llm",
                       "planner.model_path=/models/planner", "run.output_dir=", "world.task_mix.abstract=0"])
    assert cfg.world.heldout_compositions == ["swap:square"]
    assert cfg.planner.model_path == "/models/planner"
    assert cfg.run.output_dir == ""  # 'key=' means empty string, not null


def test_save_reloads_identically(tmp_path):
    cfg = load_config([str(CONFIGS / "tiny.yaml"), "world.frame_size=64", "critic.kind=vlm"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert path.is_file()
    assert load_config([str(path)]) == cfg
    d = config_to_dict(cfg)
    assert json.loads(json.dumps(d)) == d == dataclasses.asdict(cfg)
    assert d["world"]["frame_size"] == 64


def test_validate_accepts_dataclass_and_dict():
    assert validate(Config()) == Config()
    assert validate({"loop": {"mode": "open_loop"}}).loop.mode == "open_loop"
    bad = Config()
    bad.loop.max_retries = -3
    with pytest.raises(ConfigError, match=r"loop\.max_retries=-3"):
        validate(bad)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------- bad configs

BAD_OVERRIDES = [
    # (args, substrings the message must contain)
    (["wrld.frame_size=64"], ["'wrld'", "top level", "world"]),
    (["world.frame_sz=64"], ["world.frame_sz", "frame_size"]),
    (["critic.thresholds.sharpness=0.5"], ["critic.thresholds.sharpness", "visual_quality"]),
    (["world=3"], ["world=3", "mapping"]),
    (["world.frame_size=abc"], ["world.frame_size", "abc", "Integer"]),
    (["world.frame_size=3.5"], ["world.frame_size", "3.5"]),
    (["reward.weights.physical_fidelity=-0.1"], ["reward.weights.physical_fidelity=-0.1", "[0, inf)"]),
    ([f"reward.weights.{k}=0" for k in ("action_completeness", "physical_fidelity",
                                        "temporal_consistency", "visual_quality")],
     ["reward.weights", "at least one"]),
    (["world.task_mix.single=0", "world.task_mix.chain=0", "world.task_mix.abstract=0"],
     ["world.task_mix", "at least one"]),
    (["loop.max_retries=-1"], ["loop.max_retries=-1", "[0, inf)"]),
    (["world.frame_size=30"], ["world.frame_size=30", "model.patch_size=4"]),
    (["model.patch_size=5"], ["world.frame_size=32", "model.patch_size=5"]),
    (["model.preset=huge"], ["model.preset='huge'", "wan2.2-5b"]),
    (["run.split=dev"], ["run.split='dev'", "heldout"]),
    (["model.attn_backend=xformers"], ["model.attn_backend='xformers'", "flash_attn"]),
    (["model.sample_steps=0"], ["model.sample_steps=0", "[1, inf)"]),
    (["model.shift=0"], ["model.shift=0", "(0, inf)"]),
    (["train.zero_stage=4"], ["train.zero_stage=4", "[0, 3]"]),
    (["train.bf16=maybe"], ["train.bf16='maybe'", "auto"]),
    (["train.bf16=1"], ["train.bf16=1", "'auto', true or false"]),
    (["train.t_sampling=beta"], ["train.t_sampling='beta'", "logit_normal"]),
    (["train.batch_size=0"], ["train.batch_size=0", "[1, inf)"]),
    (["train.lr=0"], ["train.lr=0", "(0, inf)"]),
    (["train.steps=30", "train.pause_after=30"], ["train.pause_after=30", "train.steps=30"]),
    (["world.min_objects=4", "world.max_objects=3"], ["world.min_objects=4", "world.max_objects=3"]),
    (["world.max_objects=5"], ["world.max_objects=5", "[2, 4]"]),
    (["world.size_min=0.15", "world.size_max=0.1"], ["world.size_min=0.15", "world.size_max=0.1"]),
    (["world.move_step=0.7"], ["world.move_step=0.7", "(0, 0.5]"]),
    (["world.move_step=0"], ["world.move_step=0", "(0, 0.5]"]),
    (["critic.thresholds.visual_quality=1.5"], ["critic.thresholds.visual_quality=1.5", "[0, 1]"]),
    (["critic.colour_tolerance=300"], ["critic.colour_tolerance=300", "(0, 255]"]),
    (["world.heldout_compositions=[fly:square]"], ["world.heldout_compositions[0]='fly:square'", "jump:triangle"]),
    (["world.heldout_compositions=[jump_triangle]"], ["world.heldout_compositions[0]", "jump_triangle"]),
    (["world.heldout_compositions=3"], ["world.heldout_compositions"]),
    (["planner.kind=llm"], ["planner.model_path", "planner.kind='llm'"]),
    (["world.frame_size=${nope}"], ["world.frame_size", "nope"]),
    (["frame_size"], ["'frame_size'", "key=value"]),
    (["--world.frame_size=64"], ["--world.frame_size=64", "dotted"]),
    (["cluster.mode=swarm"], ["cluster.mode='swarm'", "local"]),
    (["grpo.prompts_per_iter=3", "grpo.group_size=3"],
     ["grpo.prompts_per_iter=3", "grpo.group_size=3", "9 segments", "cluster.learner_ranks=2"]),
    (["cluster.micro_batch=3"], ["cluster.micro_batch=3", "per-rank batch of 16", "cluster.learner_ranks=2"]),
    (["cluster.bf16=true"], ["cluster.bf16=true", "cluster.learner_gpus"]),
    (["cluster.offload_optimizer=true", "cluster.zero_stage=0"], ["cluster.offload_optimizer", "cluster.zero_stage"]),
    (["cluster.weight_sync=broadcast", "cluster.learner_gpus=1"],
     ["cluster.weight_sync='broadcast'", "cluster.learner_gpus=1", "cluster.rollout_gpus=0"]),
    (["cluster.learner_ranks=0"], ["cluster.learner_ranks=0", "[1, inf)"]),
    (["grpo.pipeline=true", "cluster.mode=local"], ["grpo.pipeline=true", "cluster.mode='ray'"]),
]


@pytest.mark.parametrize("args,needles", BAD_OVERRIDES, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_bad_override_fails_at_load_naming_the_key(args, needles):
    with pytest.raises(ConfigError) as err:
        load_config(args)
    for needle in needles:
        assert needle in str(err.value), f"{needle!r} not in {str(err.value)!r}"


def test_bad_yaml_content_names_key_and_file(tmp_path):
    unknown_top = write_yaml(tmp_path, "u.yaml", "critics:\n  kind: vlm\n")
    unknown_nested = write_yaml(tmp_path, "n.yaml", "critic:\n  thresholds:\n    sharpness: 0.5\n")
    wrong_type = write_yaml(tmp_path, "t.yaml", "world:\n  frame_size: abc\n")
    zero_weights = write_yaml(tmp_path, "w.yaml", "reward:\n  weights: {action_completeness: 0, "
                              "physical_fidelity: 0, temporal_consistency: 0, visual_quality: 0}\n")
    not_mapping = write_yaml(tmp_path, "l.yaml", "- 1\n- 2\n")
    cases = [(unknown_top, ["'critics'", "critic", unknown_top]),
             (unknown_nested, ["critic.thresholds.sharpness", "action_completeness", unknown_nested]),
             (wrong_type, ["world.frame_size", "abc", wrong_type]),
             (zero_weights, ["reward.weights", "at least one"]),
             (not_mapping, [not_mapping, "mapping"])]
    for path, needles in cases:
        with pytest.raises(ConfigError) as err:
            load_config([path])
        for needle in needles:
            assert needle in str(err.value), f"{needle!r} not in {str(err.value)!r}"


def test_missing_or_broken_yaml_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not found") as err:
        load_config([missing])
    assert missing in str(err.value)
    broken = write_yaml(tmp_path, "broken.yaml", "world: [\n")
    with pytest.raises(ConfigError) as err:
        load_config([broken])
    assert broken in str(err.value)


def test_all_errors_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(["loop.max_retries=-1", "loop.max_replans=-2", "model.preset=huge"])
    msg = str(err.value)
    assert "loop.max_retries=-1" in msg and "loop.max_replans=-2" in msg and "model.preset" in msg


def test_vocabulary_matches_the_world():
    """The config's verb/shape/score names must agree with the modules that use them."""
    from spiral_rl import config
    try:
        from spiral_rl.records import SCORE_DIMS
        from spiral_rl.world.dynamics import VERBS
        from spiral_rl.world.scene import SHAPES
    except ImportError as e:  # sibling modules are written in parallel
        pytest.skip(f"world modules not importable: {e}")
    assert set(config.VERBS) == set(VERBS) and set(config.SHAPES) == set(SHAPES)
    assert tuple(f.name for f in dataclasses.fields(ScoreDims)) == tuple(SCORE_DIMS)
