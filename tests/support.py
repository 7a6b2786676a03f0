"""Helpers shared by the tests (data, values files, subprocess CLI, MLflow client).

Kept out of conftest.py: tests/k8s has a conftest of its own, and two modules named ``conftest`` shadow
each other when a test imports from one.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_DIR = ROOT / ".cache" / "models" / "smollm2-135m-instruct"

POS = ["great", "wonderful", "fun", "brilliant", "lovely", "superb", "moving", "clever"]
NEG = ["awful", "boring", "dull", "terrible", "poor", "weak", "messy", "bland"]
NOUNS = ["movie", "film", "plot", "cast", "story", "ending", "script", "show"]


def toy_rows(n: int, seed: int = 0, label_key: str = "label", text_key: str = "text") -> list[dict[str, Any]]:
    """Sentiment rows whose label is decided by one word: learnable in a few dozen steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pos = i % 2 == 0
        word = rng.choice(POS if pos else NEG)
        rows.append({text_key: f"the {rng.choice(NOUNS)} was {word} and {rng.choice(NOUNS)}",
                     label_key: "pos" if pos else "neg"})
    return rows


def qa_rows(n: int) -> list[dict[str, Any]]:
    """SQuAD v2-shaped rows: a third unanswerable, the rest answered by a span of the context."""
    rows = []
    for i in range(n):
        name = ["Alice", "Bob", "Carol", "Dave"][i % 4]
        city = ["Paris", "Rome", "Oslo", "Lima"][i % 4]
        context = f"the movie was great and {name} lives in {city} with a cat. the plot was dull."
        if i % 3 == 2:  # unanswerable
            rows.append({"id": f"q{i}", "question": f"Where does {name}'s dog live?", "context": context,
                         "answers": {"text": [], "answer_start": []}})
        else:
            rows.append({"id": f"q{i}", "question": f"Where does {name} live?", "context": context,
                         "answers": {"text": [city], "answer_start": [context.index(city)]}})
    return rows


def text_rows(n: int) -> list[dict[str, Any]]:
    """WikiText-shaped rows: one line of text each."""
    words = "the movie was great and the plot was fun but the cast was dull and the story was messy".split()  # noqa: SIM905
    return [{"text": " ".join(words[(i + j) % len(words)] for j in range(12)) + "\n"} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_tiny_model(kind: str, tok_dir: Path, out: Path, width: int = 64, layers: int = 2,
                    positions: int = 128) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    heads = max(2, width // 64)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=len(tok), n_positions=positions, n_embd=width, n_layer=layers, n_head=heads,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                          max_position_embeddings=positions, bos_token_id=tok.eos_token_id,
                          eos_token_id=tok.eos_token_id)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def experiment(model: Path, data: dict[str, str], tmp: Path, runs: dict[str, Any] | None = None,
               **defaults: Any) -> dict[str, Any]:
    """A values-file document for a custom toy task on a tiny model, writing only under ``tmp``."""
    base = {
        "model": {"name": str(model), "max_length": 32},
        "task": {"name": "custom", "text_fields": ["text"], "labels": ["neg", "pos"]},
        "data": {"data_files": data},
        # fp32: the tests pin losses and compare runs exactly; precision auto would pick bf16 autocast on CPUs
        # with bf16 units (tests/test_throughput.py covers that path).
        "training": {"epochs": 1, "learning_rate": 5e-3, "per_device_train_batch_size": 8, "precision": "fp32",
                     "logging_steps": 2, "eval_strategy": "epoch", "save_strategy": "epoch"},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "output_root": str(tmp / "outputs"),
    }
    for key, value in defaults.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return {"experiment": {"name": "toy", "defaults": base, "runs": runs or {"lora": {}}}}


def write_values(tmp: Path, doc: dict[str, Any], name: str = "values.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m lora_exp`` as a separate process, as a container would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lora_exp", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


class Job:
    """``python -m lora_exp <command>`` as a subprocess whose log lines can be waited for as they come."""

    def __init__(self, values: Path, cwd: Path, env: dict[str, str] | None = None, command: str = "train",
                 args: list[str] | None = None, launcher: list[str] | None = None) -> None:
        """``launcher``: what runs the module, e.g. ``["-m", "torch.distributed.run", "--nproc-per-node", "2"]``
        (a signal to the job then goes to torchrun, which passes it to its workers, as in a pod)."""
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, *(launcher or []), "-m", "lora_exp", command, "-f", str(values),
                                      *(args or [])],
                                     cwd=cwd,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 300) -> bool:
        """True once a line holds ``text``; False if the job ended without one."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(text in line for line in self.lines):
                return True
            if self.proc.poll() is not None:
                self._reader.join(5)
                return any(text in line for line in self.lines)
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {text!r}:\n{''.join(self.lines[-40:])}")

    def finish(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    @property
    def log(self) -> str:
        return "".join(self.lines)


def mlflow_client(tmp: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")


def assert_pinned_losses(tmp: Path, name: str, pinned: dict[str, list[float]], steps: int) -> None:
    """The one run of experiment ``toy`` in ``tmp``'s store logged these losses, step by step, to 1e-4 (printed,
    for a deliberate re-pin: ``pytest -s``)."""
    import pytest

    client = mlflow_client(tmp)
    (mrun,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    losses = [m.value for m in sorted(client.get_metric_history(mrun.info.run_id, "loss"), key=lambda m: m.step)]
    print(f"\n{name!r}: {[round(v, 6) for v in losses]},")
    assert len(losses) == steps
    assert losses == pytest.approx(pinned[name], abs=1e-4)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
