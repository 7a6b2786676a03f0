"""The MLflow tags lora-exp writes and reads: one definition each, shared by writers (tracking, the
pipelines) and readers (selection, compare, status, sanity)."""

from __future__ import annotations

# Tag keys
JOB = "job"
METHOD = "method"
TASK = "task"
MODEL = "model"
FORMULATION = "formulation"
GIT_COMMIT = "git_commit"
HARDWARE_PROFILE = "hardware_profile"
IMAGE = "image"
VALUES_FILE = "lora_exp.values_file"
RUN_KEY = "lora_exp.run"  # the run's key in its values file
EXPERIMENT = "lora_exp.experiment"
RELEASE = "lora_exp.release"  # the Helm release, set by the chart
GROUP = "lora_exp.group"  # the run key of which a run is one repeat (repeats/seeds): reports aggregate the group
SEED = "lora_exp.seed"
ALLOCATOR = "lora_exp.cpu_allocator"  # the job process's C allocator (lora_exp.core.allocator): tcmalloc or system
SWEEP_OF = "lora_exp.sweep"  # the sweep (run key) a trial belongs to
PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's own: the UI nests child runs under their parent
RUN_UID = "lora_exp.run_uid"  # the key in the run's directory: reattaches an attempt killed before recording the id
EVAL_SOURCE = "eval.source"  # what an eval job evaluated
KD = "kd"  # distill jobs: whether the teacher's soft targets were used
TEACHER_RUN_ID = "distill.teacher_run_id"
STUDENT = "distill.student"
SANITY_PASSED = "sanity.passed"
SANITY_FAILED = "sanity.failed"
SELECTION = "lora_exp.selection"
COMPARED_RUNS = "lora_exp.compared_runs"
PARAMS_CUT = "lora_exp.params_cut"  # params longer than MLflow keeps, cut: the whole spec is the spec.yaml artifact

# Values of ``job``
TRAIN, EVAL, DISTILL, SANITY, COMPARE, SWEEP = "train", "eval", "distill", "sanity", "compare", "sweep"
TRAINING_JOBS = (TRAIN, DISTILL)  # jobs that train (loss curves, trainable parameters, an artifact)
RESULT_JOBS = (*TRAINING_JOBS, EVAL)  # jobs whose runs hold results; compare/sanity runs never do

# Values of ``method`` for jobs that train no method of their own
NO_METHOD = "none"

# Value of ``eval.source`` for an eval of the untouched base model (the baseline)
BASELINE_SOURCE = "base"


def kd_value(kd: bool) -> str:
    return "true" if kd else "false"


def kd_of(tags: dict[str, str]) -> bool | None:
    """True/False for a distill run with/without KD, None for any other run."""
    value = tags.get(KD)
    return {"true": True, "false": False}.get(value) if value is not None else None
ENERGY = "energy_joules"  # GPU energy of one attempt of a run (NVML), one point per attempt
