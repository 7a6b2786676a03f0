"""IMDB movie-review sentiment (stanfordnlp/imdb): 25k train, 25k test, long texts."""

from __future__ import annotations

from lora_exp.tasks.base import ClassificationTask, register_task

IMDB = ClassificationTask(
    name="imdb",
    hub_path="stanfordnlp/imdb",
    text_fields=("text",),
    labels=("neg", "pos"),
    template="Review: {text}",
    prompt_suffix="\nSentiment:",
    eval_splits=("test",),
)

register_task(IMDB)
