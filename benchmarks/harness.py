"""lora-exp against a plain Trainer + PEFT script, on the same workloads, interleaved.

    python benchmarks/harness.py                      # CPU: SmolLM2-135M, the four workloads (make bench)
    python benchmarks/harness.py --gpu                # + GPT-2 large and a ~1B Llama shape (make bench-gpu)
    python benchmarks/harness.py --smoke              # a tiny random model, one short pass (CI)
    python benchmarks/harness.py --gpu-check          # the GPU check's workloads (scripts/gpu-check.sh)

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

from workloads import Workload, gpu_check_workloads, workloads  # noqa: E402

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
    import torch
    from transformers import AutoTokenizer

    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    # Initialised on the GPU where there is one (a 1B model's random init takes ~30 s on the host), saved in fp32.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = _random_model(kind, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _random_model(kind: str, tok: Any) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if kind == "tiny":
        cfg: Any = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
        model: Any = LlamaForCausalLM(cfg)
    elif kind == "gpt2-large":
        cfg = GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=1280, n_layer=36, n_head=20)
        model = GPT2LMHeadModel(cfg)
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=1024))
    elif kind == "tiny-gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=32, n_layer=2, n_head=4))
    elif kind == "llama-1b":  # Llama 3.2 1B's shape, with this tokenizer's vocabulary
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                          tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(kind)
    return model


def measure(side: str, w: Workload, data: Path, timeout: float | None = None) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "driver.py"), "--side", side, "--workload", json.dumps(w.as_dict()),
           "--data", str(data)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "jobs"), os.environ.get("PYTHONPATH", "")])}
    if side == "ours" and allocator.wanted() == allocator.TCMALLOC:  # as lora-exp's CPU jobs run (its CLI restarts
        env = allocator.preloading(env)  # itself on it); the reference, a plain script, runs on the system's
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode or line is None:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        return {"error": f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
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

    runs = [r for r in runs if "error" not in r]
    if not runs:
        return {}
    steady = [r for r in runs if r.get("steady_seconds")]
    out: dict[str, Any] = {
        "train_samples_per_s": statistics.median(r["train_samples"] / r["train_seconds"] for r in runs),
        "steady_samples_per_s": statistics.median(r["steady_samples"] / r["steady_seconds"] for r in steady)
        if steady else None,
        "train_tokens_per_s": statistics.median(r["train_tokens"] / r["train_seconds"] for r in runs),
        "eval_samples_per_s": statistics.median(r["eval_samples"] / r["eval_seconds"] for r in runs),
        "peak_rss_mb": med("peak_rss_mb"), "peak_gpu_mb": med("peak_gpu_mb"), "plan_peak_mb": med("plan_peak_mb"),
        "accuracy": med("accuracy"), "eval_loss": med("eval_loss"),
    }
    if out["plan_peak_mb"] and out["peak_gpu_mb"]:
        out["plan_error"] = out["plan_peak_mb"] / out["peak_gpu_mb"] - 1
    if gpu_peak:
        per_token = model_flops_per_token(model_dir, w.method)
        out["mfu"] = per_token * out["train_tokens_per_s"] / (gpu_peak * 1e12)
        if steady:  # tokens per sample are the same in the steady steps as over the run
            tokens_per_sample = statistics.median(r["train_tokens"] / r["train_samples"] for r in runs)
            out["steady_mfu"] = per_token * out["steady_samples_per_s"] * tokens_per_sample / (gpu_peak * 1e12)
    return out


ROWS = [("train samples/s", "train_samples_per_s", "{:.1f}"),
        ("train samples/s, steady state", "steady_samples_per_s", "{:.1f}"),
        ("train tokens/s", "train_tokens_per_s", "{:.0f}"),
        ("eval samples/s", "eval_samples_per_s", "{:.1f}"), ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
        ("peak GPU memory (MB)", "peak_gpu_mb", "{:.0f}"), ("memory plan (MB)", "plan_peak_mb", "{:.0f}"),
        ("MFU", "mfu", "{:.1%}"), ("MFU, steady state", "steady_mfu", "{:.1%}"),
        ("accuracy", "accuracy", "{:.4f}"), ("eval loss", "eval_loss", "{:.4f}")]


def table(name: str, sides: dict[str, dict[str, Any]]) -> str:
    """One workload's figures: lora-exp, the reference, lora-exp / reference, then any variants of lora-exp."""
    ours, ref = sides.get("ours", {}), sides.get("reference", {})
    variants = [k for k in sides if k not in ("ours", "reference")]
    head = ["", "lora-exp", "reference", "lora-exp / reference", *(f"lora-exp {v.split(':', 1)[1]}" for v in variants)]
    lines = [f"### {name}", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, key, fmt in ROWS:
        values = [sides[k].get(key) for k in ("ours", "reference", *variants)]
        if all(v is None for v in values):
            continue
        a, b = ours.get(key), ref.get(key)
        ratio = f"{a / b:.2f}x" if a is not None and b and key not in ("plan_peak_mb",) else ""
        cells = [fmt.format(v) if v is not None else "-" for v in values]
        lines.append("| " + " | ".join([label, cells[0], cells[1], ratio, *cells[2:]]) + " |")
    if ours.get("plan_error") is not None:
        lines.append(f"\nMemory plan against lora-exp's measured peak (PyTorch's peak allocation): "
                     f"{ours['plan_error']:+.1%}.")
    return "\n".join(lines)


def parse_variants(items: list[str]) -> dict[str, dict[str, Any]]:
    """``NAME=JSON`` -> {"ours:NAME": spec overrides} (e.g. ``eager={"training": {"torch_compile": false}}``)."""
    out = {}
    for item in items:
        name, _, body = item.partition("=")
        out[f"ours:{name}"] = json.loads(body)
    return out


def build_plan(args: argparse.Namespace, work: Path, gpu_peak: float | None) -> list[tuple[str, Path, Workload]]:
    if args.smoke:
        tiny = random_model(work / "tiny", "tiny", args.model)
        plan = [("tiny", tiny, replace(w, steps=2, train_rows=24, eval_rows=12, batch_size=4, eval_batch_size=4))
                for w in workloads(str(tiny))]
        args.reps = 1
    elif args.gpu_check:
        kinds = dict(zip(("llama-1b", "gpt2-large", "gpt2"),
                         ("tiny", "tiny-gpt2", "tiny-gpt2") if args.tiny else ("llama-1b", "gpt2-large", "gpt2"),
                         strict=True))
        paths = {name: work / kind for name, kind in kinds.items()}
        plan = [(w.label.split()[0], Path(w.model), w) for w in gpu_check_workloads(
            {k: str(v) for k, v in paths.items()}, steps=args.steps or 60)]
        if args.only:  # build only the models the chosen workloads use
            plan = [p for p in plan if p[2].name in args.only or p[2].label in args.only]
        for name in {m for m, _, _ in plan}:
            random_model(paths[name], kinds[name], args.model)
        if args.tiny:
            plan = [(m, d, replace(w, train_rows=48, eval_rows=24, batch_size=min(w.batch_size, 4),
                                   max_length=min(w.max_length, 64), row_tokens=None)) for m, d, w in plan]
    else:
        name = "SmolLM2-135M" if args.model == DEFAULT_MODEL else args.model.name
        plan = [(name, args.model, w) for w in workloads(str(args.model), gpu=bool(gpu_peak))]
        if args.gpu:
            for kind in ("gpt2-large", "llama-1b"):
                path = random_model(work / kind, kind, args.model)
                plan += [(kind, path, w) for w in workloads(str(path), gpu=True)
                         if w.name in ("classification-lora", "verbalizer-lora", "classification-full")]
        if args.steps:
            plan = [(m, d, replace(w, steps=args.steps)) for m, d, w in plan]
    if args.only:
        plan = [p for p in plan if p[2].name in args.only or p[2].label in args.only]
    return plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                    help="the CPU workloads' model (a local dir); the random models take its tokenizer")
    ap.add_argument("--gpu", action="store_true", help="also GPT-2 large and a ~1B Llama shape (random weights)")
    ap.add_argument("--gpu-check", action="store_true",
                    help="the GPU check's workloads (workloads.gpu_check_workloads), random-weight models")
    ap.add_argument("--tiny", action="store_true", help="with --gpu-check: tiny models and data (a CPU rehearsal)")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, 2 steps, one repetition (CI)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per side (medians are reported)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per workload (default: the workload's)")
    ap.add_argument("--only", nargs="*", help="workload names or labels to run (default: all)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="also measure lora-exp with these spec overrides, e.g. "
                         "'eager={\"training\": {\"torch_compile\": false}}' (repeatable)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per measurement (a stuck one is recorded)")
    ap.add_argument("--profile", type=Path, default=None, help="write an operator profile of 3 steady steps of "
                    "each measurement here (torch.profiler; slows those steps, not the timed rate's others)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks.md")
    ap.add_argument("--work", type=Path, default=None, help="data and random models (default: a temp dir)")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="lora-exp-bench-"))
    info = machine()
    gpu_peak = info.get("gpu_peak_tflops")
    if args.profile:
        os.environ["LORA_EXP_BENCH_PROFILE"] = str(args.profile)
    plan = build_plan(args, work, gpu_peak)
    variants = parse_variants(args.variant)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = "python benchmarks/harness.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results = []
    for model_name, model_dir, w in plan:
        data = work / "data" / f"{model_dir.name}-{w.max_length}-{w.row_tokens}-{w.train_rows}-{w.eval_rows}"
        order = ["ours", "reference", *variants]
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in order}
        for rep in range(args.reps):
            for side in (order if rep % 2 == 0 else order[::-1]):
                wv = replace(w, extra=variants[side]) if side in variants else w
                r = measure(side.split(":")[0], wv, data, args.timeout)
                runs[side].append(r)
                print(f"{w.label or model_name + ' ' + w.name} rep {rep + 1} {side}: " + (r["error"] if "error" in r
                      else f"train {r['train_samples'] / r['train_seconds']:.1f} samples/s"
                      + (f" (steady {r['steady_samples'] / r['steady_seconds']:.1f})" if r.get("steady_seconds")
                         else "") + f", eval {r['eval_samples'] / r['eval_seconds']:.1f} samples/s, "
                      f"accuracy {r.get('accuracy')}, peak GPU {r.get('peak_gpu_mb')}, plan {r.get('plan_peak_mb')}, "
                      f"process {r.get('process_seconds', 0):.0f} s (startup {r.get('startup_seconds', 0):.0f} s, "
                      f"train {r['train_seconds']:.1f} s, eval {r['eval_seconds']:.1f} s)"),
                      flush=True)
        summary = {side: summarize(rs, w, gpu_peak, model_dir) for side, rs in runs.items()}
        results.append({"model": model_name, "workload": w.as_dict(), "raw": runs, "sides": summary, **summary})
        write_report(args, info, command, started, results)  # after each workload: a stopped run keeps its figures
    print(write_report(args, info, command, started, results))


def write_report(args: argparse.Namespace, info: dict[str, Any], command: str, started: str,
                 results: list[dict[str, Any]]) -> str:
    md = ["# Benchmarks: lora-exp against plain Trainer + PEFT", "",
          f"Produced by `{command.strip()}` on {started}.", "",
          "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + ".", "",
          f"Each figure is the median of {args.reps} fresh-process runs per side, the sides interleaved. The "
          "reference is `benchmarks/reference.py` (dynamic padding, the Trainer's defaults); both sides train "
          "the same model, data, adapter, batch size, steps and seed (`benchmarks/workloads.py`). lora-exp's "
          "side runs on the C allocator its CPU jobs run on (tcmalloc where installed; docs/planning.md), the "
          "reference, a plain script, on the system's. *Train samples/s* is the whole `train()` call (one-time "
          "costs such as a compile included); *steady state* times the steps after a warm-up fifth of the run "
          "(at most 10 steps), the device synchronised at both ends (`benchmarks/timing.py`). GPU figures and "
          "what was found there: [benchmarks-gpu.md](benchmarks-gpu.md).", ""]
    for res in results:
        w = res["workload"]
        used = {side: "/".join(sorted({r.get("allocator", "?") for r in rs if "allocator" in r}))
                for side, rs in res["raw"].items()}
        settings = next((r["settings"] for r in res["raw"].get("ours", []) if "settings" in r), None)
        errors = [f"{side}: {r['error']}" for side, rs in res["raw"].items() for r in rs if "error" in r]
        title = (f"{w.get('label') or res['model'] + ': ' + w['name']} (batch {w['batch_size']}"
                 + (f" x {w['gradient_accumulation_steps']}" if w.get("gradient_accumulation_steps", 1) > 1 else "")
                 + f", {w['steps']} steps, max length {w['max_length']})")
        md += [table(title, res["sides"]),
               "\nAllocator: " + ", ".join(f"{side} {a}" for side, a in used.items() if a) + "."
               + (f" lora-exp chose: {json.dumps(settings)}." if settings else "")
               + ("".join(f"\n\nFailed: {e}" for e in errors)), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(md))
    args.out.with_suffix(".json").write_text(json.dumps({"machine": info, "command": command, "started": started,
                                                         "results": results}, indent=2))
    return "\n".join(md)


if __name__ == "__main__":
    main()
