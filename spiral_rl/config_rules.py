"""The rules `config.validate` checks: each field's own (range / choices / any_positive, kept in
the field's metadata by `config.param`) and those that relate several fields. Every message
names the dotted key, the bad value and what is allowed."""
from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spiral_rl.config import Config


def in_range(x: Any, spec: str) -> bool:
    """Is x inside an interval written like '(0, 0.5]' or '[1, inf)'? (NaN never is.)"""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
        return False
    lo, hi = (float(s) for s in spec[1:-1].split(","))
    return (lo < x if spec[0] == "(" else lo <= x) and (x < hi if spec[-1] == ")" else x <= hi)


def rule_errors(obj: Any, prefix: str = "") -> list[str]:
    """Walk a dataclass tree generically and check every field's metadata rules."""
    errors = []
    for f in fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        if is_dataclass(value):  # rules on a container apply to each of its items
            items = [(f"{key}.{g.name}", getattr(value, g.name)) for g in fields(value)]
        elif isinstance(value, list):
            items = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
        else:
            items = [(key, value)]
        rules = f.metadata
        for k, v in items:
            if "choices" in rules and v not in rules["choices"]:
                errors.append(f"{k}={v!r} is not one of {list(rules['choices'])}")
            if "range" in rules and not in_range(v, rules["range"]):
                errors.append(f"{k}={v!r} is out of range; allowed {rules['range']}")
        if rules.get("any_positive") and not any(in_range(v, "(0, inf]") for _, v in items):
            got = {k.rsplit(".", 1)[-1]: v for k, v in items}
            errors.append(f"{key}: at least one value must be > 0, got {got}")
        # Recurse so nested dataclasses (also inside lists) get their own rules checked.
        if is_dataclass(value):
            errors += rule_errors(value, key + ".")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if is_dataclass(v):
                    errors += rule_errors(v, f"{key}[{i}].")
    return errors


def cross_field_errors(c: Config) -> list[str]:
    """Rules that relate several fields; keep this list short and explicit."""
    w, m, errors = c.world, c.model, []
    if w.min_objects > w.max_objects:
        errors.append(f"world.min_objects={w.min_objects} must be <= "
                      f"world.max_objects={w.max_objects}")
    if w.size_min > w.size_max:
        errors.append(f"world.size_min={w.size_min} must be <= world.size_max={w.size_max}")
    if w.frame_size % m.patch_size:
        errors.append(f"world.frame_size={w.frame_size} must be divisible by "
                      f"model.patch_size={m.patch_size}")
    if not (c.train.bf16 == "auto" or isinstance(c.train.bf16, bool)):  # 1 == True, so check the type
        errors.append(f"train.bf16={c.train.bf16!r} must be 'auto', true or false")
    if c.train.pause_after >= c.train.steps:
        errors.append(f"train.pause_after={c.train.pause_after} must be < train.steps={c.train.steps} "
                      "(0 runs to the end)")
    if c.planner.kind == "llm" and not c.planner.model_path:
        errors.append("planner.model_path='' must name a local model dir when planner.kind='llm'")
    if c.grpo.pipeline and c.cluster.mode != "ray":
        errors.append("grpo.pipeline=true overlaps rollout workers with the learner group: it needs cluster.mode='ray' "
                      "(cluster.mode='local' shares one model between them)")
    if c.cluster.mode == "ray":
        errors += cluster_errors(c)
    elif c.cluster.micro_batch and (c.grpo.prompts_per_iter * c.grpo.group_size) % c.cluster.micro_batch:
        errors.append(f"cluster.micro_batch={c.cluster.micro_batch} must divide the learner batch of "
                      f"grpo.prompts_per_iter={c.grpo.prompts_per_iter} x grpo.group_size={c.grpo.group_size} segments")
    return errors


def cluster_errors(c: Config) -> list[str]:
    """The distributed run's batch and placement rules (cluster.mode='ray')."""
    g, k, errors = c.grpo, c.cluster, []
    segments = g.prompts_per_iter * g.group_size
    if k.learner_ranks < 1:
        pass  # reported by its range rule
    elif segments % k.learner_ranks:
        errors.append(f"grpo.prompts_per_iter={g.prompts_per_iter} x grpo.group_size={g.group_size} = {segments} "
                      f"segments per learner step do not split evenly over cluster.learner_ranks={k.learner_ranks}")
    elif k.micro_batch and (segments // k.learner_ranks) % k.micro_batch:
        errors.append(f"cluster.micro_batch={k.micro_batch} must divide the per-rank batch of "
                      f"{segments // k.learner_ranks} segments (grpo.prompts_per_iter={g.prompts_per_iter} x "
                      f"grpo.group_size={g.group_size} / cluster.learner_ranks={k.learner_ranks})")
    if k.bf16 and not k.learner_gpus:
        errors.append("cluster.bf16=true needs GPU learners (cluster.learner_gpus > 0)")
    if k.offload_optimizer and k.zero_stage == 0:
        errors.append("cluster.offload_optimizer=true needs cluster.zero_stage >= 1")
    if k.weight_sync == "broadcast" and bool(k.learner_gpus) != bool(k.rollout_gpus):
        errors.append(f"cluster.weight_sync='broadcast' needs cluster.learner_gpus={k.learner_gpus} and "
                      f"cluster.rollout_gpus={k.rollout_gpus} both 0 (gloo) or both > 0 (NCCL)")
    return errors
