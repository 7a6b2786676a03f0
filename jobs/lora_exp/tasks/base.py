"""What a classification task is: where its rows come from, how a row reads as text, what its labels are."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ClassificationTask:
    """A sentence(-pair) classification task.

    ``template`` renders a row's text fields into the model's input. The classifier formulation reads
    the rendered text; the verbalizer formulation appends ``prompt_suffix`` and scores each label word.
    """

    name: str
    text_fields: tuple[str, ...]
    labels: tuple[str, ...]
    template: str
    prompt_suffix: str
    label_field: str = "label"
    hub_path: str | None = None
    hub_config: str | None = None
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("validation",)
    metrics: tuple[str, ...] = ("accuracy", "f1_macro")
    # Binary tasks whose papers report F1 of the positive class (MRPC) name it here.
    positive_label: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.labels)
