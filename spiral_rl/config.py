"""One structured config for the whole system, plus loading and validation (the rules: config_rules.py).

Composition, e.g. `python -m spiral_rl.config configs/tiny.yaml world.frame_size=64`:
dataclass defaults <- each *.yaml/*.yml file in order <- each dotted `key=value` override
(always applied after the files) -> validation (types, ranges, choices, cross-field rules).
Any problem raises ConfigError at load time naming the dotted key, the bad value and what
is allowed, so a typo never silently becomes a default deep inside a run.

load_config returns a plain validated `Config` dataclass (not an OmegaConf DictConfig): fast
attribute access in hot loops. Treat it as read-only; if you change it, call validate() again.
"""

import re
import sys
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from spiral_rl.config_rules import cross_field_errors, rule_errors

VERBS = ("move", "move_to", "push", "jump", "swap")
SHAPES = ("square", "circle", "triangle")
COMPOSITIONS = tuple(f"{v}:{s}" for v in VERBS for s in SHAPES)  # 'verb:shape' pairs


class ConfigError(ValueError):
    """Bad config: the message names the dotted key, the bad value and what is allowed."""


def param(default: Any = MISSING, *, factory: Any = MISSING, **rules: Any) -> Any:
    """A dataclass field with validation rules in its metadata (checked by `validate`):
    range="(lo, hi]" (interval notation, inf allowed), choices=(...), any_positive=True.
    On a list/dataclass field range and choices apply to each element/sub-field, which lets
    one shared type (ScoreDims) get different rules in different places."""
    return field(default=default, default_factory=factory, metadata=rules)


# --------------------------------------------------------------------------- schema


@dataclass
class ScoreDims:
    """One number per critic dimension; reused for pass thresholds and reward weights."""
    action_completeness: float = 0.0  # did the requested action actually happen?
    physical_fidelity: float = 0.0  # plausible motion: no teleports, bystanders stay put
    temporal_consistency: float = 0.0  # objects keep shape/colour/identity across frames
    visual_quality: float = 0.0  # frames are sharp, on-palette, not smeared


@dataclass
class TaskMix:
    """Relative sampling weights of task types (normalised, so they need not sum to 1)."""
    single: float = 0.4  # one instruction, e.g. 'push the circle'
    chain: float = 0.4  # several instructions in sequence
    abstract: float = 0.2  # goal stated abstractly; the planner must decompose it


@dataclass
class WorldConfig:
    frame_size: int = param(32, range="[8, inf)")  # square frames, pixels; small = CPU-fast
    # Frames generated per sub-action (>= 2, or there is no motion to judge).
    segment_frames: int = param(8, range="[2, inf)")
    # Frames from memory conditioning the world model (at least the current frame).
    context_frames: int = param(2, range="[1, inf)")
    min_objects: int = param(2, range="[2, 4]")  # objects per scene; the renderer does 2..4
    max_objects: int = param(4, range="[2, 4]")
    # Object half-extent as a fraction of the canvas; above 0.2 scenes get too crowded.
    size_min: float = param(0.09, range="(0, 0.2]")
    size_max: float = param(0.12, range="(0, 0.2]")
    move_step: float = param(0.25, range="(0, 0.5]")  # 'move left' etc., canvas fraction
    push_distance: float = param(0.2, range="(0, 0.5]")  # how far a pushed object slides
    jump_height: float = param(0.2, range="(0, 0.5]")  # apex height of a jump
    max_chain: int = param(4, range="[2, 6]")  # longest chained instruction
    # How often each task type is sampled.
    task_mix: TaskMix = param(factory=TaskMix, range="[0, inf)", any_positive=True)
    # 'verb:shape' pairs never seen in training; only the 'heldout' split uses them.
    heldout_compositions: list[str] = param(
        factory=lambda: ["jump:triangle", "push:circle"], choices=COMPOSITIONS)
    seed: int = param(0, range="[0, inf)")  # scene sampling (numpy wants seeds >= 0)


@dataclass
class ModelConfig:
    # tiny/small are trained here; wan2.2-5b-pixel is the 5B shape on pixels (scaling runs); wan2.2-5b loads Wan.
    preset: str = param("tiny", choices=("tiny", "small", "wan2.2-5b-pixel", "wan2.2-5b"))
    patch_size: int = param(4, range="[1, inf)")  # world.frame_size must be a multiple
    max_text_len: int = param(64, range="[2, inf)")  # text tokens incl. <bos>; a clause is <= 9
    # Also give every frame the last context frame as extra input channels (Wan2.1 I2V's channel
    # concatenation): copying what does not move becomes a local operation, learnt in hundreds of
    # steps instead of thousands through attention to the context frames alone.
    concat_context: bool = True
    # Recompute each DiT block's activations in backward: less memory, ~30% more compute.
    gradient_checkpointing: bool = False
    # Attention kernel: 'auto' is torch SDPA with cuDNN first on Hopper GPUs, else flash-attn when
    # installed and usable, else torch SDPA; 'cudnn' pins SDPA to cuDNN (CUDA only).
    attn_backend: str = param("auto", choices=("auto", "flash_attn", "sdpa", "cudnn", "math"))
    # torch.compile each DiT block: fuses the fp32 norms / modulation / RoPE between the matmuls
    # (a 5B learner step on an H100: benchmarks/RESULTS.md). Compiles at the first call (GPU).
    compile: bool = False
    # Keep the DiT's residual stream in fp32 (Wan's original numerics). false: store it in the
    # weights' dtype, each add still computed in fp32 (diffusers' Wan); in bf16 that halves its
    # memory traffic and activation memory (benchmarks/RESULTS.md).
    fp32_residual: bool = True
    # TF32 matmuls for fp32 weights on CUDA, sampling and learner alike (so rho == 1 still holds).
    tf32: bool = False
    # World-model checkpoint (a world_model.pt file, or a dir holding one) to start from;
    # '' = random init. launch/sft.py writes one to <run.output_dir>/world_model.pt.
    pretrained_path: str = ""
    sample_steps: int = param(20, range="[1, inf)")  # ODE (and SDE) denoising steps per segment
    # Classifier-free guidance scale; 1 = off (one model call per step, no unconditional pass).
    guidance: float = param(1.0, range="[0, inf)")
    # Timestep shift t' = s t / (1 + (s - 1) t) for training and sampling; > 1 favours high noise.
    shift: float = param(1.0, range="(0, inf)")


@dataclass
class PlannerConfig:
    # 'builtin' = rule-based decomposition (no weights needed); 'llm' = local language model.
    kind: str = param("builtin", choices=("builtin", "llm"))
    model_path: str = ""  # local dir with LLM weights; required when kind='llm'


@dataclass
class CriticConfig:
    # 'builtin' = pixel heuristics on the synthetic world; 'vlm' = vision-language model.
    kind: str = param("builtin", choices=("builtin", "vlm"))
    # A segment passes when every dimension reaches its threshold.
    thresholds: ScoreDims = param(factory=lambda: ScoreDims(0.8, 0.8, 0.8, 0.6), range="[0, 1]")
    # Max RGB distance (0-255 units) for a pixel to count as an object's colour.
    colour_tolerance: float = param(60.0, range="(0, 255]")
    # A per-frame jump > this / segment_frames canvas widths is a teleport (frame-rate independent).
    teleport_canvas_per_segment: float = param(2.4, range="(0, inf)")
    # Objects not named in the instruction may drift at most this canvas fraction.
    bystander_tolerance: float = param(0.06, range="(0, 0.5]")


AGGREGATIONS = ("weighted_sum", "per_dim_normalise", "gated")  # reward aggregations: grpo.py says what each asks


@dataclass
class RewardConfig:
    weights: ScoreDims = param(factory=lambda: ScoreDims(0.5, 0.25, 0.15, 0.1),  # completion dominates on purpose
                               range="[0, inf)", any_positive=True)
    aggregation: str = param("weighted_sum", choices=AGGREGATIONS)


@dataclass
class LoopConfig:
    # open_loop: generate the whole instruction blindly; plan_only: plan sub-actions, never
    # check them; spiral: plan -> generate -> critique -> retry / replan.
    mode: str = param("spiral", choices=("open_loop", "plan_only", "spiral"))
    max_retries: int = param(2, range="[0, inf)")  # regenerations of a failing segment
    max_replans: int = param(2, range="[0, inf)")  # replans of the rest before giving up
    # Episodes advanced side by side (0 = all of a call's); their pending segments are generated as
    # one batch. Decisions stay per episode, so this changes speed, not results (up to float order).
    episode_batch: int = param(8, range="[0, inf)")


@dataclass
class RunConfig:
    output_dir: str = "runs/demo"  # logs, videos and the saved config of this run
    seed: int = param(0, range="[0, inf)")  # torch/numpy/python; separate from world.seed
    num_tasks: int = param(4, range="[1, inf)")
    # Task split to draw from ('heldout' = only world.heldout_compositions).
    split: str = param("val", choices=("train", "val", "test", "heldout"))


@dataclass
class TrainConfig:
    """World-model pre-training on the built-in world (launch/sft.py: Ray Train + DeepSpeed)."""
    steps: int = param(2000, range="[1, inf)")  # optimizer steps
    batch_size: int = param(8, range="[1, inf)")  # segments per rank per step
    lr: float = param(3e-4, range="(0, inf)")  # peak AdamW learning rate, cosine-decayed to 0
    weight_decay: float = param(0.0, range="[0, inf)")
    warmup_steps: int = param(100, range="[0, inf)")  # linear warm-up from 0 to lr
    grad_clip: float = param(1.0, range="[0, inf)")  # max global gradient norm; 0 = no clipping
    num_train_tasks: int = param(512, range="[1, inf)")  # tasks of the 'train' split (all their steps)
    num_val_tasks: int = param(16, range="[1, inf)")  # tasks of the 'val' split for evaluation
    # Noisy demonstrations: this share of the train segments stops short of its caption
    # (SegmentDataset); 0 = exact ones. Val segments are always exact.
    stop_short_share: float = param(0.0, range="[0, 1]")
    # Every N steps: validation loss and critic scores of ODE samples; 0 = only at the end.
    eval_every: int = param(0, range="[0, inf)")
    checkpoint_every: int = param(500, range="[0, inf)")  # 0 = only at the end
    log_every: int = param(10, range="[1, inf)")
    zero_stage: int = param(2, range="[0, 3]")  # DeepSpeed ZeRO stage
    # bf16 mixed precision: 'auto' = on where the device supports it (CUDA with bf16), else off.
    bf16: Any = param("auto", choices=("auto", True, False))
    num_workers: int = param(1, range="[1, inf)")  # Ray Train workers (ranks), one GPU each if use_gpu
    use_gpu: bool = False
    # Continue from the latest checkpoint in run.output_dir (else that dir must hold none).
    resume: bool = False
    # Start a new run.output_dir from this checkpoint_step<N>/ directory of an earlier run (one
    # copied from another cluster, say): weights, AdamW, step, data order and history go on from it.
    resume_from: str = ""
    # Stop after this step as if it were the end (evaluation, world_model.pt), keeping the lr
    # schedule of train.steps; train.resume=true goes on. 0 = run to train.steps.
    pause_after: int = param(0, range="[0, inf)")
    # Noise-level sampling of the flow-matching loss (SD3's logit-normal favours mid noise).
    t_sampling: str = param("logit_normal", choices=("uniform", "logit_normal"))


@dataclass
class GRPOConfig:
    """GRPO post-training (launch/grpo.py). Defaults after Flow-GRPO's Wan preset, scaled to the CPU world."""
    iterations: int = param(40, range="[1, inf)")
    episodes_per_iter: int = param(4, range="[1, inf)")  # closed-loop train episodes that supply prompts
    prompts_per_iter: int = param(8, range="[1, inf)")  # (context, sub-action) prompts sampled from them
    # 'retried': steps whose first attempt the critic rejected come first, then the rest at random;
    # 'incomplete': steps in order of their first attempt's action completeness, lowest first.
    prompt_focus: str = param("all", choices=("all", "retried", "incomplete"))
    group_size: int = param(4, range="[2, inf)")  # SDE samples per prompt (G)
    # SDE denoising steps per GRPO sample. Fewer than model.sample_steps (which every episode and
    # evaluation keeps) is Flow-GRPO's denoising reduction: a GRPO segment then costs about
    # grpo.sample_steps / model.sample_steps of a full one, to sample and to train on.
    sample_steps: int = param(10, range="[1, inf)")
    noise_level: float = param(0.7, range="(0, inf)")  # Flow-GRPO's 'a' in sigma_t = a sqrt(t / (1 - t))
    # Noisy steps per rollout (0 = all): a shared window, as MixGRPO, so members stay comparable.
    window: int = param(0, range="[0, inf)")
    train_steps: int = param(0, range="[0, inf)")  # steps of the window trained on per update (0 = all)
    # One initial noise per group (DanceGRPO's shared initialisation): members differ only by the
    # window's SDE noise, so a reward difference within a group comes from the window's steps.
    # Off: on the tiny model it lowered fidelity in every run tried (benchmarks/RESULTS.md section 8).
    shared_noise: bool = False
    updates_per_iter: int = param(1, range="[1, inf)")  # learner steps on each iteration's groups
    lr: float = param(1e-4, range="(0, inf)")
    # Comma-separated parameter-name substrings the update trains (e.g. 'cross_attn'); the rest stay
    # frozen. '' = every parameter. A small batch's gradient is mostly noise, and AdamW moves every
    # trained parameter ~lr per step whatever its signal (benchmarks/grpo_gradient_noise.py).
    trainable: str = ""
    clip_range: float = param(1e-3, range="(0, 1)")  # on per-element ratios when reduction='mean'
    kl_coef: float = param(0.004, range="[0, inf)")  # beta of the KL to the frozen reference
    # Log-prob reduction over latent elements; the clip range must match it (see grpo.py).
    reduction: str = param("mean", choices=("mean", "sum"))
    adv_clip: float = param(5.0, range="(0, inf)")
    max_grad_norm: float = param(1.0, range="(0, inf)")
    eval_every: int = param(10, range="[0, inf)")  # iterations; 0 = only before and after
    eval_tasks: int = param(24, range="[1, inf)")  # run.split tasks for the mode comparison
    replay_capacity: int = param(20000, range="[1, inf)")  # scored segments kept on disk
    checkpoint_every: int = param(10, range="[0, inf)")  # iterations between saves under checkpoints/ (0: at the end)
    resume: bool = False  # go on from run.output_dir's latest checkpoint (else it must hold none)
    # Iteration n+1's rollouts overlap iteration n's learner step (cluster.mode=ray; one update off-policy).
    pipeline: bool = False
    # Allow model.pretrained_path='' (random weights): throughput benchmarks only.
    random_init: bool = False
    # Save the last checkpoint and world_model.pt at the end (false: large-model benchmarks).
    save_final: bool = True


@dataclass
class ClusterConfig:
    """Where launch/grpo.py runs its stages: in its own process (local), or on Ray actors (ray):
    N rollout workers, M critic servers, one replay-store actor and a learner group of K DeepSpeed
    ranks, all in one placement group. With no address the driver starts a local Ray."""
    mode: str = param("ray", choices=("local", "ray"))
    # Ray cluster to join; '' = $RAY_ADDRESS (`ray job submit` sets it), else start a local Ray.
    address: str = ""
    rollout_workers: int = param(1, range="[1, inf)")  # N: closed-loop episodes and SDE groups
    critic_servers: int = param(1, range="[1, inf)")  # M: batched scoring, load-balanced by the driver
    learner_ranks: int = param(2, range="[1, inf)")  # K: data-parallel ranks, one DeepSpeed engine each
    # Ray resources per actor; an actor's torch threads = max(1, int(cpus)). Stages run one after
    # another, so a local Ray counts the CPUs as the sum of these, not the cores it has.
    rollout_cpus: float = param(1.0, range="(0, inf)")
    critic_cpus: float = param(0.5, range="(0, inf)")
    learner_cpus: float = param(1.0, range="(0, inf)")
    rollout_gpus: float = param(0.0, range="[0, 1]")  # fractions share a GPU (e.g. 0.5 each on one card)
    learner_gpus: float = param(0.0, range="[0, 1]")  # 0: CPU and gloo; > 0: CUDA and NCCL
    placement: str = param("pack", choices=("pack", "spread"))  # placement-group strategy
    zero_stage: int = param(2, range="[0, 3]")  # DeepSpeed ZeRO stage of the learner group
    # bf16 learner forward (GPU only). The recomputed log-probs then differ from the fp32 rollout's
    # and the first-ratio guard (grpo.py) may refuse the update; off unless rollouts match it.
    bf16: bool = False
    offload_optimizer: bool = False  # ZeRO optimizer state in CPU memory (zero_stage >= 1)
    # Segments per learner forward on a rank (cluster.mode=local: of the one process); 0 = the whole
    # batch; must divide it. On GPU take the largest that fits: ZeRO-3 gathers the weights for every
    # pass (5B on 4xH200: 4 -> 16 cut the update 3.5x); on a CPU small ones (16 of 128 segments:
    # 1.65-1.83x the whole batch on 2 cores, benchmarks/grpo_cpu_costs.py).
    micro_batch: int = param(0, range="[0, inf)")
    # SDE samples per forward when a rollout worker draws its groups (0 = all at once). The noise is
    # drawn for the whole call first, so this changes speed and memory, not the samples.
    rollout_micro_batch: int = param(0, range="[0, inf)")
    # Learner -> rollout weights after each update: 'object_store' (one put of a numpy state dict),
    # 'broadcast' (bucketed torch.distributed broadcast: NCCL on GPU, gloo on CPU), 'auto': broadcast
    # when learners and rollout workers each hold a whole GPU, else object_store.
    weight_sync: str = param("auto", choices=("auto", "object_store", "broadcast"))
    sync_bucket_mb: float = param(64.0, range="(0, inf)")  # broadcast bucket size
    critic_timeout_s: float = param(120.0, range="(0, inf)")  # a critic call slower than this is retried
    critic_retries: int = param(2, range="[0, inf)")  # retries of a failed or slow call before failing the run


@dataclass
class Config:
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


# --------------------------------------------------------------------------- validation


@contextmanager
def _wrap_omegaconf_errors(source: str):
    """Turn omegaconf's exceptions into a ConfigError that leads with the dotted key."""
    try:
        yield
    except OmegaConfBaseException as e:
        msg, key = str(getattr(e, "msg", None) or e).splitlines()[0], getattr(e, "full_key", None)
        raise ConfigError(f"{key + ': ' if key else ''}{msg} (from {source})") from e


def _check_keys(schema: DictConfig, overlay: dict, source: str, prefix: str = "") -> None:
    """Reject unknown keys (listing the valid ones) and scalars where a section belongs."""
    for k, v in overlay.items():
        key = f"{prefix}{k}"
        if k not in schema:
            where = f"'{prefix[:-1]}'" if prefix else "top level"
            raise ConfigError(f"unknown key '{key}' (from {source}); "
                              f"valid keys at {where}: {list(schema)}")
        if isinstance(schema[k], DictConfig):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}={v!r} (from {source}) must be a mapping "
                                  f"with keys {list(schema[k])}")
            _check_keys(schema[k], v, source, key + ".")


def _merge(base: DictConfig, overlay: DictConfig, source: str) -> DictConfig:
    _check_keys(OmegaConf.structured(Config), OmegaConf.to_container(overlay), source)
    with _wrap_omegaconf_errors(source):
        return OmegaConf.merge(base, overlay)  # type-checks and converts each value


def validate(cfg: "Config | DictConfig | dict") -> Config:
    """Check types, per-field and cross-field rules; return the validated Config. Accepts a
    Config, a DictConfig or a nested dict (missing keys take their defaults). Raises
    ConfigError listing every rule violation found."""
    plain = asdict(cfg) if is_dataclass(cfg) else cfg  # re-type-check a hand-built Config
    node = _merge(OmegaConf.structured(Config), OmegaConf.create(plain), "config")
    with _wrap_omegaconf_errors("config"):
        obj = OmegaConf.to_object(node)  # also resolves ${...} interpolations
    errors = rule_errors(obj) + cross_field_errors(obj)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return obj


# --------------------------------------------------------------------------- loading / saving

_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def load_config(args: "list[str] | None" = None) -> Config:
    """Compose defaults <- YAML files (in order) <- key=value overrides; return a validated
    Config dataclass. Override values are parsed as YAML; a token containing '=' is always
    an override. None or [] gives the defaults (scripts pass sys.argv[1:] explicitly)."""
    files, overrides = [], []
    for tok in args or []:
        if "=" in tok:
            overrides.append(tok)
        elif tok.endswith((".yaml", ".yml")):
            files.append(tok)
        else:
            raise ConfigError(f"bad argument {tok!r}: expected a .yaml/.yml file or a "
                              "key=value override such as world.frame_size=64")

    cfg = OmegaConf.structured(Config)
    for path in files:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            overlay = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors and the like
            raise ConfigError(f"could not parse config file {path}: {e}") from e
        if not isinstance(overlay, DictConfig):
            raise ConfigError(f"config file {path} must contain a mapping at top level")
        cfg = _merge(cfg, overlay, path)
    for tok in overrides:
        key, value = tok.split("=", 1)
        if not _KEY.match(key):
            raise ConfigError(f"bad override {tok!r}: key must be dotted, e.g. world.frame_size=64")
        overlay = OmegaConf.from_dotlist([f"{key}=''" if value == "" else tok])  # 'k=' -> ''
        cfg = _merge(cfg, overlay, f"override {tok!r}")
    return validate(cfg)


def _as_node(cfg: "Config | DictConfig") -> DictConfig:
    return OmegaConf.structured(cfg) if is_dataclass(cfg) else cfg


def config_to_dict(cfg: "Config | DictConfig") -> dict:
    """Plain nested dict of builtins (for JSON records)."""
    return OmegaConf.to_container(_as_node(cfg), resolve=True)


def save_config(cfg: "Config | DictConfig", path: "str | Path") -> Path:
    """Write the resolved YAML (load_config([path]) reproduces cfg); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(_as_node(cfg), resolve=True))
    return path


def load_config_or_exit(args: list[str]) -> Config:
    """load_config for command-line drivers: a bad config exits with its message, no traceback."""
    try:
        return load_config(args)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


if __name__ == "__main__":  # python -m spiral_rl.config configs/tiny.yaml world.frame_size=64
    print(OmegaConf.to_yaml(_as_node(load_config_or_exit(sys.argv[1:]))), end="")
