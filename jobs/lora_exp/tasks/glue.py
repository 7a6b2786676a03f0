"""GLUE tasks (nyu-mll/glue on the hub): MNLI, MRPC, SST-2, RTE, CoLA.

GLUE's test splits carry no labels (-1), so final evaluation uses the validation splits; MNLI has two,
matched (same genres as training) and mismatched (new genres), reported separately.
"""

from __future__ import annotations

from lora_exp.tasks.base import ClassificationTask, register_task

GLUE = "nyu-mll/glue"

MNLI = ClassificationTask(
    name="mnli",
    hub_path=GLUE,
    hub_config="mnli",
    text_fields=("premise", "hypothesis"),
    labels=("entailment", "neutral", "contradiction"),
    template="Premise: {premise}\nHypothesis: {hypothesis}",
    prompt_suffix="\nRelationship:",
    eval_splits=("validation_matched", "validation_mismatched"),
)

MRPC = ClassificationTask(
    name="mrpc",
    hub_path=GLUE,
    hub_config="mrpc",
    text_fields=("sentence1", "sentence2"),
    labels=("not_equivalent", "equivalent"),
    template="Sentence 1: {sentence1}\nSentence 2: {sentence2}",
    prompt_suffix="\nParaphrase:",
    metrics=("accuracy", "f1", "f1_macro"),
    positive_label="equivalent",
)

SST2 = ClassificationTask(
    name="sst2",
    hub_path=GLUE,
    hub_config="sst2",
    text_fields=("sentence",),
    labels=("negative", "positive"),
    template="Review: {sentence}",
    prompt_suffix="\nSentiment:",
)

RTE = ClassificationTask(
    name="rte",
    hub_path=GLUE,
    hub_config="rte",
    text_fields=("sentence1", "sentence2"),
    labels=("entailment", "not_entailment"),
    template="Premise: {sentence1}\nHypothesis: {sentence2}",
    prompt_suffix="\nRelationship:",
)

COLA = ClassificationTask(
    name="cola",
    hub_path=GLUE,
    hub_config="cola",
    text_fields=("sentence",),
    labels=("unacceptable", "acceptable"),
    template="Sentence: {sentence}",
    prompt_suffix="\nGrammatical:",
    metrics=("accuracy", "mcc", "f1_macro"),
)

for _task in (MNLI, MRPC, SST2, RTE, COLA):
    register_task(_task)
