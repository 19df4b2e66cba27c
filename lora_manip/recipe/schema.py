"""The recipe schema: one typed model of a training run. Defaults live only here; `lora-manip eval`, `predict` and
`data check` read theirs from these fields.

Everything is validated before any model is loaded: unknown keys, wrong types and impossible combinations (checks.py)
are reported together, each naming its key path (`lora.r: must be > 0`).
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from ..dtypes import WEIGHT_NAMES, WEIGHT_SHORT_NAMES
from .checks import cross_check
from .names import SYNTH_TASKS, TRAIN_EVAL_MAX_NEW_TOKENS
from .registry import resolve_data_section

PartMode = Literal["frozen", "full", "lora"]
# A path a user wrote: `~` means the home folder wherever it stands (YAML, --set, an override), as the shell would
# read it, so that every reader (the kit, transformers, DeepSpeed) gets the same folder; a hub id has no `~`.
UserPath = Annotated[str, AfterValidator(os.path.expanduser)]
SAVED_RUN = "saved_run"  # validation context: a run folder's recipe.yaml, read back (load.read_run_recipe)


class _Strict(BaseModel):
    # Misspelt keys must fail, not be silently ignored (the torchtune/LLaMA-Factory lesson).
    # allow_inf_nan=False: `lr: .inf` would train to a NaN adapter and exit 0.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelCfg(_Strict):
    path: UserPath = Field(description="Hub id (llava-hf/llava-onevision-qwen2-7b-ov-hf) or local folder in HF layout.")
    dtype: Literal[WEIGHT_NAMES] = Field(
        "bfloat16", description="Dtype the weights are loaded in. On CPU everything runs in float32 (bf16 is "
        "unusably slow there); the switch is logged.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="auto: flash_attention_2 when flash-attn and a CUDA GPU are present, else sdpa.")
    create_tiny_if_missing: bool = Field(
        False, description="Demo only: write a tiny random LLaVA-OneVision at `path` when it does not exist.")
    adapter: UserPath | None = Field(
        None, description="objective grpo: an SFT LoRA adapter folder trained on `path`, loaded and trained further "
        "(its own LoRA settings and parts are kept); the result is an adapter on `path` like the SFT one.")


class LoraCfg(_Strict):
    r: int = Field(16, gt=0, description="Rank; higher increases capacity and memory.")
    alpha: float = Field(32, gt=0, description="Scale is alpha / r (alpha / sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Linear layer names inside the parts trained with `lora`; matched only under those parts.")
    use_rslora: bool = False
    use_dora: bool = False


class QuantCfg(_Strict):
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal[WEIGHT_NAMES] = "bfloat16"


class PartCfg(_Strict):
    train: PartMode | None = Field(
        None, description="frozen | full | lora. None follows `method`: language model lora (full under "
        "method: full), projector full, vision tower frozen.")
    lr: float = Field(2e-5, gt=0, le=1, description="Learning rate of this part's trainable parameters.")


class PartsCfg(_Strict):
    language_model: PartCfg = Field(default_factory=lambda: PartCfg(lr=2e-4))
    projector: PartCfg = Field(default_factory=lambda: PartCfg(lr=2e-5))
    vision_tower: PartCfg = Field(default_factory=lambda: PartCfg(lr=4e-6))


class DatasetCfg(_Strict):
    annotation_path: UserPath = Field(description="LLaVA conversation JSON (.json array or .jsonl). May be left out "
                                 "when `name` is in data.registry.")
    data_path: UserPath = Field(description="Folder the records' image paths are relative to. May be left out when "
                           "`name` is in data.registry.")
    name: str | None = Field(None, description="A dataset of data.registry (its paths are filled in from there), "
                             "or a label. `name%NN` samples NN% of it, like upstream.")
    sample: float | None = Field(
        None, gt=0, description="Fraction (<= 1, like upstream's name%NN) or count (> 1) of records, seeded.")
    val_fraction: float | None = Field(
        None, gt=0, lt=1, description="Seeded share of this dataset's records held out for validation (disjoint "
        "from train; split before `sample` is applied).")


class SynthCfg(_Strict):
    n: int = Field(400, gt=1)
    seed: int = Field(0, ge=0, lt=2**32)
    tasks: list[Literal[SYNTH_TASKS]] | None = Field(None, min_length=1,
                                                     description="Render only these tasks (default: all).")


class DataCfg(_Strict):
    registry: UserPath | None = Field(
        None, description="Dataset registry YAML (name -> annotation_path, data_path), set once per machine; "
        "default: the LORA_MANIP_REGISTRY environment variable. See lora_manip/recipe/registry.py.")
    train: list[DatasetCfg] = Field(min_length=1)
    val: list[DatasetCfg] = Field(default_factory=list, description="Validation datasets, in addition to the "
                                  "records train entries hold out with val_fraction.")
    system_prompt: str | None = Field(
        "You are a helpful assistant.", description="Added as the system turn when a record has none.")
    model_max_length: int = Field(32768, gt=0, description="Counts image tokens. Longer samples are dropped "
                                  "(never cut inside an image) and counted in the log.")
    on_too_long: Literal["drop"] = Field(
        "drop", description="What happens to a sample longer than model_max_length: dropped and counted (it is "
        "never cut, which would split an image's tokens or remove the answer).")
    skip_bad_records: bool = Field(
        False, description="false: training refuses to start on broken records (all listed). true: they are "
        "skipped and counted per reason in the log.")
    min_traj_points: int = Field(2, ge=1, description="A trajectory answer with fewer points is a bad record.")
    seed: int | None = Field(None, ge=0, lt=2**32,
                             description="Seed of dataset sampling and validation splits; default train.seed.")
    create_synthetic_if_missing: SynthCfg | None = Field(
        None, description="Demo only: generate the synthetic data set into the first train dataset's "
        "data_path when its annotation file does not exist.")
    num_workers: int = Field(0, ge=0)
    group_by_length: bool = Field(
        True, description="Batch samples of similar length, images and text-only apart (less padding); false: "
        "random order.")
    packing: bool = Field(
        False, description="Concatenate samples into rows of up to train.max_tokens_per_batch tokens, positions "
        "restarting per sample so attention never crosses samples (flash-attention varlen on a GPU, a "
        "block-diagonal mask otherwise). Needs train.max_tokens_per_batch.")
    max_image_tiles: int | None = Field(
        None, ge=1, le=36, description="Cap anyres at this many grid tiles per image (LLaVA-OneVision's "
        "anyres_max_N is 9 for the features; this also caps the vision tower's tiles): the pinpoints are limited "
        "to grids of at most N tiles, identically in length measurement, training and generation.")

    @model_validator(mode="before")
    @classmethod
    def _resolve_datasets(cls, raw: Any) -> Any:
        # Registry names and name%NN resolved before field validation, so the recipe saved with a run lists paths.
        if isinstance(raw, dict):
            raw = resolve_data_section(raw)
        return raw


class TrainCfg(_Strict):
    output_dir: UserPath
    per_device_batch_size: int = Field(1, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="> 0 overrides epochs; -1: train.epochs decides.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "mezo"] = Field(
        "adamw_torch", description="mezo: zeroth-order (two forward passes, no backward, no optimizer state).")
    mezo_eps: float = Field(1e-3, gt=0, description="MeZO perturbation scale.")
    loss_reduction: Literal["token", "sample"] = Field(
        "token", description="token: mean over all answer tokens of the batch (LLaVA, transformers). sample: mean "
        "of each sample's token mean, so a one-letter answer weighs as much as a 40-token box answer.")
    max_tokens_per_batch: int | None = Field(
        None, gt=0, description="Fill each micro-batch up to this many tokens (LM tokens incl. padding + "
        "vision-tower tiles x tokens per tile) instead of per_device_batch_size samples: a step's memory is bounded "
        "by the budget. Loss normalisation stays exact (it counts tokens or samples, not batches).")
    gradient_checkpointing: bool | list[Literal["lm", "vision_tower"]] = Field(
        False, description="true: both towers; or a list of the parts to checkpoint, e.g. [lm] or [lm, "
        "vision_tower] (a trained vision tower at anyres holds every layer's activations for every tile).")
    precision: Literal[WEIGHT_SHORT_NAMES] = "bf16"
    tf32: bool = False
    seed: int = Field(42, ge=0, lt=2**32)  # numpy and torch seeds are 32-bit
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(500, gt=0)
    save_total_limit: int | None = Field(2, gt=0)
    report_to: list[Literal["none", "tensorboard", "wandb"]] = Field(default_factory=lambda: ["none"])
    eval_steps: int | None = Field(
        None, gt=0, description="Every N steps and at the last, generate answers (greedy) for eval_limit validation "
        "samples with the model being trained and log the manipulation metrics (eval_box.acc@0.1, "
        "eval_choice.accuracy, ...) to train_log.jsonl and report_to. Needs validation data. None: off.")
    eval_limit: int = Field(64, gt=0, description="Validation samples per eval: a seeded subset, the same each time.")
    eval_max_new_tokens: int = Field(TRAIN_EVAL_MAX_NEW_TOKENS, gt=0,
                                     description="Longest answer generated during eval, in tokens.")
    best_metric: str | None = Field(
        None, description="kind.metric (box.acc@0.1, choice.accuracy, trajectory.dtw, ...): each eval that improves "
        "it saves the model to OUTPUT_DIR/best_checkpoint (never rotated away). Lower is better for distances "
        "and parse_failure_rate, higher for the rest (recipe/names.py). Needs eval_steps.")


class DistributedCfg(_Strict):
    nproc_per_node: int = Field(1, gt=0, description="Processes (GPUs) per node; > 1 relaunches under torchrun.")
    nnodes: int = Field(1, gt=0)
    node_rank: int = Field(0, ge=0)
    master_addr: str = Field("127.0.0.1", description="Node 0's address: the rendezvous host of a multi-node run.")
    master_port: int = Field(29500, ge=1, le=65535)
    rdzv_endpoint: str | None = Field(None, description="host:port of the c10d rendezvous of a multi-node run "
                                      "(default: master_addr:master_port, under SLURM the job's first node).")
    max_restarts: int = Field(0, ge=0, description="torchrun restarts of failed processes (they continue from the "
                              "newest complete checkpoint); the CLI's --max-restarts overrides it.")
    slurm: bool = Field(True, description="Inside an srun step, take the node count, this node's rank and the "
                        "rendezvous host from SLURM_* (docs/training.md, \"Several nodes\").")
    deepspeed: UserPath | None = Field(None, description="DeepSpeed JSON config, relative to the recipe file.")


class GrpoCfg(_Strict):
    """Reinforcement fine-tuning with TRL's GRPOTrainer (train/grpo.py); TRL's names where TRL has them."""

    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (one group).")
    max_completion_length: int = Field(64, gt=0, description="Longest completion, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens only (0: all). A small model's long "
                       "tail (stray tokens inside a number) makes most full-distribution samples unparseable.")
    min_p: float | None = Field(None, ge=0, le=1, description="Drop tokens below min_p x the likeliest's probability.")
    beta: float = Field(0.04, ge=0, description="KL coefficient against the starting model (0: no reference).")
    epsilon: float = Field(0.2, gt=0, description="Clip range of the policy ratio (lower side, and upper when "
                           "epsilon_high is unset).")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clip range (DAPO's clip-higher).")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    num_iterations: int = Field(1, gt=0, description="Optimisation passes per generated batch (mu).")
    mask_truncated_completions: bool = False
    distance_scale: float = Field(0.1, gt=0, description="Point / trajectory distance (normalised image units) at "
                                  "which their rewards fall to 1/e.")
    rewards: dict[str, dict[str, float]] = Field(
        default_factory=lambda: {"box": {"iou": 1.0, "iou_bonus": 0.5, "format": 0.1},
                                 "point": {"distance": 1.0, "format": 0.1},
                                 "pointing": {"in_mask": 1.0, "format": 0.1},
                                 "trajectory": {"dtw": 1.0, "format": 0.1},
                                 "choice": {"accuracy": 1.0, "format": 0.1},
                                 "yesno": {"accuracy": 1.0, "format": 0.1}},
        description="Per task kind: {reward: weight}. Records of kinds not listed are left out of the run.")
    eval_at_start: bool = Field(True, description="Score the validation set before the first step, so the log "
                                "holds the starting reward next to the final one.")


class Recipe(_Strict):
    model: ModelCfg
    method: Literal["full", "lora", "qlora"]
    objective: Literal["sft", "grpo"] = Field("sft", description="sft: supervised; grpo: reinforcement "
                                              "fine-tuning with the manipulation metrics as rewards (TRL GRPO).")
    grpo: GrpoCfg | None = Field(None, description="Settings of objective: grpo (defaults when left out).")
    lora: LoraCfg = Field(default_factory=LoraCfg)
    quantization: QuantCfg = Field(default_factory=QuantCfg)
    parts: PartsCfg = Field(default_factory=PartsCfg)
    data: DataCfg
    train: TrainCfg
    distributed: DistributedCfg = Field(default_factory=DistributedCfg)

    @model_validator(mode="after")
    def _resolve_and_cross_check(self, info: ValidationInfo) -> "Recipe":
        # Resolve `train: null` from the method, so the recipe written to the run folder says what really ran.
        p = self.parts
        if p.language_model.train is None:
            p.language_model.train = "full" if self.method == "full" else "lora"
        if p.projector.train is None:
            p.projector.train = "full"
        if p.vision_tower.train is None:
            p.vision_tower.train = "frozen"
        if self.objective == "grpo" and self.grpo is None:
            self.grpo = GrpoCfg()
        if (info.context or {}).get(SAVED_RUN):  # a finished run's copy: checked when that run started
            return self
        errors = cross_check(self)
        if errors:
            raise ValueError("\n".join(errors))
        return self

    @property
    def effective_batch_size(self) -> int:
        t, d = self.train, self.distributed
        return t.per_device_batch_size * t.gradient_accumulation_steps * d.nproc_per_node * d.nnodes
