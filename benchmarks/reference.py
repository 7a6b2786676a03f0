"""The reference: what a careful user writes with a plain transformers Trainer and PEFT, no lora-exp.

Dynamic padding (DataCollatorWithPadding / DataCollatorForSeq2Seq), the Trainer's defaults (random order,
fp32 on CPU, its default attention), and for the verbalizer a causal-LM loss on the label word with an
evaluation that keeps only the answer position's label scores (preprocess_logits_for_metrics), the usual way
to stop Trainer.predict from holding every position's logits.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from workloads import LABELS, Workload

TEMPLATE = "Support ticket: {text}"
SUFFIX = "\nDepartment:"
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"]}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(w: Workload, files: dict[str, str]) -> dict[str, Any]:
    import numpy as np
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    set_seed(w.seed)
    tok = AutoTokenizer.from_pretrained(w.model)
    tok.pad_token = tok.pad_token or tok.eos_token
    raw = load_dataset("json", data_files=files)
    label_id = {name: i for i, name in enumerate(LABELS)}
    if w.formulation == "classifier":
        model = AutoModelForSequenceClassification.from_pretrained(w.model, num_labels=len(LABELS),
                                                                   pad_token_id=tok.pad_token_id)

        def encode(b: dict[str, list[Any]]) -> dict[str, Any]:
            enc = tok([TEMPLATE.format(text=t) for t in b["text"]], truncation=True, max_length=w.max_length)
            return {**enc, "labels": [label_id[x] for x in b["label"]]}

        collator: Any = DataCollatorWithPadding(tok)
        task_type, preprocess = "SEQ_CLS", None
    elif w.formulation == "verbalizer":
        model = AutoModelForCausalLM.from_pretrained(w.model)
        word_ids = [tok(" " + name, add_special_tokens=False)["input_ids"] for name in LABELS]
        first = torch.tensor([ids[0] for ids in word_ids])

        def encode(b: dict[str, list[Any]]) -> dict[str, Any]:
            out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": []}
            for text, label in zip(b["text"], b["label"], strict=True):
                prompt = tok(TEMPLATE.format(text=text) + SUFFIX)["input_ids"]
                target = word_ids[label_id[label]]
                prompt = prompt[-(w.max_length - len(target)):]
                out["input_ids"].append(prompt + target)
                out["attention_mask"].append([1] * (len(prompt) + len(target)))
                out["labels"].append([-100] * len(prompt) + target)
            return out

        def preprocess(logits: Any, labels: Any) -> Any:
            answer = (labels != -100).int().argmax(dim=1)
            rows = torch.arange(logits.shape[0])
            return logits[rows, answer - 1].float().log_softmax(-1)[:, first.to(logits.device)]

        collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
        task_type = "CAUSAL_LM"
    else:  # causal_lm: fixed blocks of max_length tokens
        model = AutoModelForCausalLM.from_pretrained(w.model)

        def encode(b: dict[str, list[Any]]) -> dict[str, Any]:
            ids = [t for text in b["text"] for t in tok(text, add_special_tokens=False)["input_ids"]]
            n = len(ids) // w.max_length * w.max_length
            blocks = [ids[i:i + w.max_length] for i in range(0, n, w.max_length)]
            return {"input_ids": blocks, "attention_mask": [[1] * w.max_length for _ in blocks],
                    "labels": [list(b) for b in blocks]}

        collator, task_type, preprocess = default_data_collator, "CAUSAL_LM", None
    if w.gradient_checkpointing:
        model.config.use_cache = False
    if w.method == "lora":
        targets = TARGETS.get(model.config.model_type, LLAMA_TARGETS)
        model = get_peft_model(model, LoraConfig(task_type=task_type, r=w.lora_r, lora_alpha=w.lora_alpha,
                                                 lora_dropout=w.lora_dropout, target_modules=targets,
                                                 fan_in_fan_out=model.config.model_type == "gpt2"))
    cols = raw["train"].column_names
    train = raw["train"].map(encode, batched=True, remove_columns=cols)
    evals = raw["validation"].map(encode, batched=True, remove_columns=cols)
    from timing import StepTimer, warm_steps

    cuda = torch.cuda.is_available()
    sixteen = {"auto": "bf16" if cuda and torch.cuda.is_bf16_supported() else None, "bf16": "bf16",
               "fp16": "fp16"}.get(w.precision) if cuda else None
    timer = StepTimer(warm_steps(w.steps), f"reference-{w.label or w.name}")
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=w.batch_size,
                                 gradient_accumulation_steps=w.gradient_accumulation_steps,
                                 gradient_checkpointing=w.gradient_checkpointing,
                                 per_device_eval_batch_size=w.eval_batch_size, learning_rate=w.learning_rate,
                                 max_steps=w.steps, seed=w.seed, report_to="none", logging_steps=10,
                                 save_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
                                 bf16=sixteen == "bf16", fp16=sixteen == "fp16",
                                 prediction_loss_only=w.formulation == "causal_lm")
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator,
                          preprocess_logits_for_metrics=preprocess, callbacks=[timer])
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pred = trainer.predict(evals)
        eval_s = time.perf_counter() - t0
    samples = w.steps * w.batch_size * w.gradient_accumulation_steps
    result: dict[str, Any] = {"train_seconds": train_s, "train_samples": samples,
                              "eval_seconds": eval_s, "eval_samples": len(evals),
                              "train_tokens": _tokens(train, w), "eval_loss": pred.metrics.get("test_loss"),
                              **timer.result(w.batch_size * w.gradient_accumulation_steps)}
    if w.formulation == "classifier":
        result["accuracy"] = float((np.asarray(pred.predictions).argmax(-1) == np.asarray(pred.label_ids)).mean())
    elif w.formulation == "verbalizer":
        gold = [LABELS.index(r["label"]) for r in raw["validation"]]
        result["accuracy"] = float((np.asarray(pred.predictions).argmax(-1) == np.asarray(gold)).mean())
    return result


def _tokens(ds: Any, w: Workload) -> float:
    """Non-padding tokens of the training samples the run consumed (the mean sample, times the samples)."""
    lengths = [len(x) for x in ds["input_ids"]]
    return sum(lengths) / len(lengths) * w.steps * w.batch_size * w.gradient_accumulation_steps

