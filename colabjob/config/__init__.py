"""The job spec: a YAML file plus ``--set key.sub=value`` overrides, validated into frozen
dataclasses (``JobSpec`` and one class per section), snapshotted with ``to_dict`` into the
job record, fingerprinted with ``config_hash`` for checkpoint manifests, and compared on
resume with ``diff_for_resume``. Loading a spec imports neither torch nor transformers.
Reference: docs/job-spec.md.
"""

from __future__ import annotations

from colabjob.config.jobspec import DEFAULT_LR, JobSpec
from colabjob.config.loader import (
    apply_overrides,
    check_local_paths,
    load_spec,
    parse_yaml,
    spec_from_text,
)
from colabjob.config.lora_targets import LORA_TARGET_MODULES, resolve_target_modules
from colabjob.config.resume import SAFE_TO_CHANGE, config_hash, diff_for_resume, exactness_fields
from colabjob.config.run_sections import DEFAULT_MARGIN, BudgetSpec, CheckpointSpec, LoggingSpec
from colabjob.config.schema import (
    KINDS,
    DataSpec,
    JobSection,
    LoraSpec,
    ModelSpec,
    TokenizerSpec,
    TokenizerTrainSpec,
    TrainingSpec,
)
from colabjob.config.templates import render_template

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_MARGIN",
    "KINDS",
    "LORA_TARGET_MODULES",
    "SAFE_TO_CHANGE",
    "BudgetSpec",
    "CheckpointSpec",
    "DataSpec",
    "JobSection",
    "JobSpec",
    "LoggingSpec",
    "LoraSpec",
    "ModelSpec",
    "TokenizerSpec",
    "TokenizerTrainSpec",
    "TrainingSpec",
    "apply_overrides",
    "check_local_paths",
    "config_hash",
    "diff_for_resume",
    "exactness_fields",
    "load_spec",
    "parse_yaml",
    "render_template",
    "resolve_target_modules",
    "spec_from_text",
]
