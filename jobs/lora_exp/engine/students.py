"""Distillation students and the KD loss.

``KDStudent`` wraps any student that returns logits and computes the distillation loss inside
``forward`` when the batch carries the teacher's logits. That keeps distillation on the one training
path: the stock Trainer sees an ordinary model whose forward returns a loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
            alpha: float, temperature: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels) (Hinton et al., 2015).

    The T^2 factor keeps the soft term's gradients on the same scale as the hard term's when T changes.
    """
    ce = F.cross_entropy(student_logits, labels)
    if alpha == 0.0 or teacher_logits is None:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                  reduction="batchmean", log_target=True)
    return alpha * t * t * kl + (1.0 - alpha) * ce


class DistilRNN(nn.Module):
    """Seed 004's student: embedding -> RNN -> linear over the last real token's state."""

    def __init__(self, vocab_size: int, num_labels: int, embedding_dim: int = 768, hidden_size: int = 768,
                 num_layers: int = 1) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.rnn = nn.RNN(embedding_dim, hidden_size, num_layers=num_layers, batch_first=True, nonlinearity="tanh")
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states, _ = self.rnn(self.embedding(input_ids))
        last = attention_mask.sum(dim=1).clamp(min=1) - 1  # right padding: the last real token
        out: torch.Tensor = self.classifier(states[torch.arange(states.shape[0], device=states.device), last])
        return out


class TransformerStudent(nn.Module):
    """A small GPT-2 classifier trained from scratch, with the teacher's vocabulary."""

    def __init__(self, vocab_size: int, num_labels: int, hidden_size: int, num_layers: int, num_heads: int,
                 max_length: int, pad_token_id: int) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2ForSequenceClassification

        cfg = GPT2Config(vocab_size=vocab_size, n_positions=max_length, n_embd=hidden_size, n_layer=num_layers,
                         n_head=num_heads, num_labels=num_labels, pad_token_id=pad_token_id)
        self.model = GPT2ForSequenceClassification(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits


class KDStudent(nn.Module):
    def __init__(self, student: nn.Module, alpha: float, temperature: float) -> None:
        super().__init__()
        self.student = student
        self.alpha, self.temperature = alpha, temperature

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                teacher_logits: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.student(input_ids, attention_mask)
        loss = None
        if labels is not None:
            loss = kd_loss(logits, teacher_logits, labels, self.alpha, self.temperature)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def build_student(spec: Any, vocab_size: int, num_labels: int, pad_token_id: int) -> nn.Module:
    s = spec.distill.student
    if s.kind == "rnn":
        return DistilRNN(vocab_size, num_labels, s.embedding_dim, s.hidden_size, s.num_layers)
    return TransformerStudent(vocab_size, num_labels, s.hidden_size, s.num_layers, s.num_heads,
                              spec.model.max_length, pad_token_id)
