"""lora-exp against a plain Trainer + PEFT script, on the same workloads, interleaved.

    python benchmarks/harness.py                      # CPU: SmolLM2-135M, the four workloads (make bench)
    python benchmarks/harness.py --gpu                # + GPT-2 large and a ~1B Llama shape (make bench-gpu)
    python benchmarks/harness.py --smoke              # a tiny random model, one short pass (CI)

Each measurement is a fresh process (``driver.py``); the sides alternate ABAB/BABA across repetitions so
drift on the machine (thermal, other tenants) hits both, and the figures are medians. Results go to
``docs/benchmarks.md`` (``--out``) with the command and the machine, and to a JSON file next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from lora_exp.core import allocator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from workloads import Workload, workloads  # noqa: E402

DEFAULT_MODEL = ROOT / ".cache/models/smollm2-135m-instruct"
# Dense bf16 tensor-core peak (TFLOP/s) by device name, from the vendors' data sheets; MFU's denominator.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0,
               "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "A10": 125.0, "L4": 121.0, "V100": 125.0,
               "B200": 2250.0, "MI300X": 1307.0}


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    info = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "python": platform.python_version()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_peak_tflops"] = peak_tflops(info["gpu"])
    return info


def peak_tflops(name: str) -> float | None:
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]
    return None


def random_model(out: Path, kind: str, tokenizer_from: Path) -> Path:
    """A random-weight model of a real shape (speed does not depend on the weights), with a real tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    if kind == "tiny":
        cfg: Any = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
        model: Any = LlamaForCausalLM(cfg)
    elif kind == "gpt2-large":
        cfg = GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=1280, n_layer=36, n_head=20)
        model = GPT2LMHeadModel(cfg)
    elif kind == "llama-1b":  # Llama 3.2 1B's shape, with this tokenizer's vocabulary
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                          tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def measure(side: str, w: Workload, data: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "driver.py"), "--side", side, "--workload", json.dumps(w.as_dict()),
           "--data", str(data)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "jobs"), os.environ.get("PYTHONPATH", "")])}
    if side == "ours" and allocator.wanted() == allocator.TCMALLOC:  # as lora-exp's CPU jobs run (its CLI restarts
        env = allocator.preloading(env)  # itself on it); the reference, a plain script, runs on the system's
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode or line is None:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"benchmark {side}/{w.name} failed (exit {proc.returncode})")
    return json.loads(line[len("BENCH "):])


def model_flops_per_token(model_dir: Path, method: str) -> float:
    """Training FLOPs per token: 2N forward; backward 2N for activations, plus 2N for weight gradients when
    the weights train (full fine-tuning). LoRA skips the frozen weights' gradients: 4N. Attention adds
    6 * layers * hidden * length (scores and values, forward and backward) at the workload's mean length."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = hidden // heads
    gated = cfg.model_type != "gpt2"
    per_layer = hidden * hidden * 2 + hidden * kv * head_dim * 2 + hidden * inter * (3 if gated else 2)
    n = layers * per_layer + cfg.vocab_size * hidden  # + the LM head (classification reads one position)
    return (6.0 if method == "full" else 4.0) * n


def summarize(runs: list[dict[str, Any]], w: Workload, gpu_peak: float | None, model_dir: Path) -> dict[str, Any]:
    def med(key: str) -> float | None:
        vals = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    out: dict[str, Any] = {
        "train_samples_per_s": statistics.median(r["train_samples"] / r["train_seconds"] for r in runs),
        "train_tokens_per_s": statistics.median(r["train_tokens"] / r["train_seconds"] for r in runs),
        "eval_samples_per_s": statistics.median(r["eval_samples"] / r["eval_seconds"] for r in runs),
        "peak_rss_mb": med("peak_rss_mb"), "peak_gpu_mb": med("peak_gpu_mb"), "accuracy": med("accuracy"),
        "eval_loss": med("eval_loss"),
    }
    if gpu_peak:
        flops = model_flops_per_token(model_dir, w.method) * out["train_tokens_per_s"]
        out["mfu"] = flops / (gpu_peak * 1e12)
    return out


ROWS = [("train samples/s", "train_samples_per_s", "{:.1f}"), ("train tokens/s", "train_tokens_per_s", "{:.0f}"),
        ("eval samples/s", "eval_samples_per_s", "{:.1f}"), ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
        ("peak GPU memory (MB)", "peak_gpu_mb", "{:.0f}"), ("MFU", "mfu", "{:.1%}"),
        ("accuracy", "accuracy", "{:.4f}"), ("eval loss", "eval_loss", "{:.4f}")]


def table(name: str, ours: dict[str, Any], ref: dict[str, Any]) -> str:
    lines = [f"### {name}", "", "| | lora-exp | reference | lora-exp / reference |", "|---|---:|---:|---:|"]
    for label, key, fmt in ROWS:
        a, b = ours.get(key), ref.get(key)
        if a is None and b is None:
            continue
        ratio = f"{a / b:.2f}x" if a is not None and b else ""
        lines.append(f"| {label} | {fmt.format(a) if a is not None else '-'} | "
                     f"{fmt.format(b) if b is not None else '-'} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the CPU workloads' model (a local dir)")
    ap.add_argument("--gpu", action="store_true", help="also GPT-2 large and a ~1B Llama shape (random weights)")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, 2 steps, one repetition (CI)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per side (medians are reported)")
    ap.add_argument("--only", nargs="*", help="workload names to run (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks.md")
    ap.add_argument("--work", type=Path, default=None, help="data and random models (default: a temp dir)")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="lora-exp-bench-"))
    info = machine()
    gpu_peak = info.get("gpu_peak_tflops")
    plan: list[tuple[str, Path, Workload]] = []
    if args.smoke:
        tiny = random_model(work / "tiny", "tiny", args.model)
        plan = [("tiny", tiny, replace(w, steps=2, train_rows=24, eval_rows=12, batch_size=4, eval_batch_size=4))
                for w in workloads(str(tiny))]
        args.reps = 1
    else:
        plan = [("SmolLM2-135M", args.model, w) for w in workloads(str(args.model), gpu=bool(gpu_peak))]
        if args.gpu:
            for kind in ("gpt2-large", "llama-1b"):
                path = random_model(work / kind, kind, args.model)
                plan += [(kind, path, w) for w in workloads(str(path), gpu=True)
                         if w.name in ("classification-lora", "verbalizer-lora", "classification-full")]
    if args.only:
        plan = [p for p in plan if p[2].name in args.only]

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = []
    for model_name, model_dir, w in plan:
        data = work / "data" / f"{model_dir.name}-{w.max_length}-{w.train_rows}-{w.eval_rows}"
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "reference": []}
        for rep in range(args.reps):
            for side in (("ours", "reference") if rep % 2 == 0 else ("reference", "ours")):
                r = measure(side, w, data)
                runs[side].append(r)
                print(f"{model_name} {w.name} rep {rep + 1} {side}: "
                      f"train {r['train_samples'] / r['train_seconds']:.1f} samples/s, "
                      f"eval {r['eval_samples'] / r['eval_seconds']:.1f} samples/s, "
                      f"accuracy {r.get('accuracy')}", flush=True)
        summary = {side: summarize(rs, w, gpu_peak, model_dir) for side, rs in runs.items()}
        results.append({"model": model_name, "workload": w.as_dict(), "raw": runs, **summary})

    command = "python benchmarks/harness.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    md = ["# Benchmarks: lora-exp against plain Trainer + PEFT", "",
          f"Produced by `{command.strip()}` on {started}.", "",
          "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + ".", "",
          f"Each figure is the median of {args.reps} fresh-process runs per side, the sides interleaved. The "
          "reference is `benchmarks/reference.py` (dynamic padding, the Trainer's defaults); both sides train "
          "the same model, data, adapter, batch size, steps and seed (`benchmarks/workloads.py`). lora-exp's "
          "side runs on the C allocator its CPU jobs run on (tcmalloc where installed; docs/planning.md), the "
          "reference, a plain script, on the system's.", ""]
    for res in results:
        w = res["workload"]
        used = {side: "/".join(sorted({r.get("allocator", "?") for r in res["raw"][side]}))
                for side in ("ours", "reference")}
        md += [table(f"{res['model']}: {w['name']} (batch {w['batch_size']}, {w['steps']} steps, "
                     f"max length {w['max_length']})", res["ours"], res["reference"]),
               f"\nAllocator: lora-exp {used['ours']}, reference {used['reference']}.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(md))
    args.out.with_suffix(".json").write_text(json.dumps({"machine": info, "command": command, "started": started,
                                                         "results": results}, indent=2))
    print("\n".join(md))


if __name__ == "__main__":
    main()
