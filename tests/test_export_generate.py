"""`lora-exp export` (merge an adapter into its base) and `lora-exp generate`."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from lora_exp.config.loading import resolve_runs
from lora_exp.engine.fit import train_run as train
from support import experiment, run_cli, write_values


@pytest.mark.parametrize(("formulation", "auto_class"), [("classifier", "AutoModelForSequenceClassification"),
                                                         ("verbalizer", "AutoModelForCausalLM")])
def test_export_then_reload_gives_the_same_logits_as_base_plus_adapter(formulation, auto_class, tmp_path,
                                                                        tiny_gpt2, toy_data):
    import transformers
    from peft import PeftModel

    values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, formulation={"kind": formulation},
                                               runs={"lora": {"method": {"name": "lora", "r": 4}}}))
    (run,) = resolve_runs(values)
    train(run)
    adapter = run.output_dir / "final"
    out = tmp_path / "merged"
    proc = run_cli("export", "--model-path", str(adapter), "--out", str(out), "--register", f"toy-{formulation}",
                   "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert yaml.safe_load((out / "lora_exp_run.yaml").read_text())["spec"]["method"] == {"name": "full"}
    # Modes as the umask says (readable by the Jobs' uid on a shared volume under the usual 022): safetensors
    # alone would leave model.safetensors 0600 whatever the umask.
    umask = os.umask(0)
    os.umask(umask)
    wrong = [p.name for p in out.rglob("*") if p.is_file() and p.stat().st_mode & 0o777 != 0o666 & ~umask]
    assert not wrong, f"modes not from the umask {umask:03o}: {wrong}"

    cls = getattr(transformers, auto_class)
    kwargs = {"num_labels": 2, "pad_token_id": 0} if formulation == "classifier" else {}
    reference = PeftModel.from_pretrained(cls.from_pretrained(tiny_gpt2, **kwargs), adapter).eval()
    merged = cls.from_pretrained(out).eval()
    ids = torch.tensor([[5, 17, 42, 9, 33, 2]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)

    from support import mlflow_client

    client = mlflow_client(tmp_path)
    run_id = client.search_runs([client.get_experiment_by_name("toy").experiment_id])[0].info.run_id
    assert "model.safetensors" in {f.path.split("/")[-1] for f in client.list_artifacts(run_id, "merged_model")}
    # --register: a registry version whose source is that artifact, tagged with the run's metrics.
    (version,) = client.search_model_versions(f"name = 'toy-{formulation}'")
    assert version.run_id == run_id and version.source.endswith("/merged_model")
    source_run = client.get_run(run_id)
    assert version.tags["method"] == "lora" and version.tags["task"] == source_run.data.tags["task"]
    assert float(version.tags["validation_accuracy"]) == source_run.data.metrics["validation_accuracy"]

    # The exported model evaluates as a full model through the eval job.
    values2 = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, formulation={"kind": formulation},
                                                runs={"merged": {"job": "eval", "eval": {"model_path": str(out)}}}),
                           name="eval.yaml")
    proc = run_cli("eval", "-f", str(values2), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _greedy(model, tokenizer, prompt: str, n: int) -> str:
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_generate_prints_the_continuation_of_the_base_and_of_base_plus_adapter(tmp_path, tiny_gpt2, toy_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    prompt = "the movie was"
    proc = run_cli("generate", "--model", str(tiny_gpt2), "--prompt", prompt, "--max-new-tokens", "8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base_text = _greedy(AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval(), tok, prompt, 8)
    assert base_text.strip()
    assert f"--- prompt: {prompt!r}\n{prompt}{base_text}\n" in proc.stdout

    values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, formulation={"kind": "verbalizer"},
                                               runs={"lm": {"method": {"name": "lora", "r": 4},
                                                            "training": {"learning_rate": 5e-2}}}))
    (run,) = resolve_runs(values)
    train(run)
    adapter = run.output_dir / "final"
    proc = run_cli("generate", "--model-path", str(adapter), "--prompt", prompt, "--max-new-tokens", "8",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2), adapter).eval()
    tuned_text = _greedy(tuned, tok, prompt, 8)
    assert tuned_text.strip() and tuned_text != base_text  # the adapter changed what the model writes
    assert f"--- prompt: {prompt!r}\n{prompt}{tuned_text}\n" in proc.stdout


def test_generate_refuses_a_model_without_a_language_model_head(tmp_path, tiny_gpt2, toy_data):
    values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, runs={"head": {
        "method": {"name": "head_only"}, "training": {"max_steps": 2}}}))
    (run,) = resolve_runs(values)
    train(run)
    proc = run_cli("generate", "--model-path", str(run.output_dir / "final"), "--prompt", "x", cwd=tmp_path)
    assert proc.returncode == 2 and "no language-model head" in proc.stdout


def test_export_register_refuses_a_bad_model_name_before_any_work(tmp_path):
    out = tmp_path / "merged"
    proc = run_cli("export", "--model-path", str(tmp_path / "nowhere"), "--out", str(out), "--register", "a/b",
                   cwd=tmp_path)
    assert proc.returncode == 2 and "--register" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()


def test_train_run_registers_its_artifact_when_the_spec_asks(tmp_path, tiny_gpt2, toy_data):
    runs = {"lora": {"method": {"name": "lora", "r": 2}, "training": {"max_steps": 2},
                     "tracking": {"register_model": "toy-lora"}}}
    values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, runs=runs))
    (run,) = resolve_runs(values)
    train(run)
    from support import mlflow_client

    client = mlflow_client(tmp_path)
    (version,) = client.search_model_versions("name = 'toy-lora'")
    source_run = client.get_run(version.run_id)
    assert source_run.info.run_name == "lora" and version.source.endswith("/model")
    # Registered after the final evaluation reached MLflow: the version carries the final metrics.
    assert float(version.tags["validation_accuracy"]) == source_run.data.metrics["validation_accuracy"]
    assert version.tags["method"] == "lora" and not [k for k in version.tags if k.startswith("system/")]
    train(run)  # a rerun of the finished run registers nothing more
    assert len(client.search_model_versions("name = 'toy-lora'")) == 1


def _trained(tmp_path, model, toy_data, formulation: str = "verbalizer", method: dict | None = None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    values = write_values(tmp_path, experiment(model, toy_data, tmp_path, formulation={"kind": formulation},
                                               training={"learning_rate": 5e-2},
                                               runs={"lora": {"method": method or {"name": "lora", "r": 4}}}))
    (run,) = resolve_runs(values)
    train(run)
    return run.output_dir / "final"


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_gguf_export_is_read_back_with_llama_cpp_names_shapes_and_weights(arch, request, tmp_path, toy_data):
    """--format gguf: the gguf package (llama.cpp's) reads the file back: architecture, hyper-parameters, the
    tokenizer, every tensor under its llama.cpp name with the merged model's values (Llama's q/k rows permuted
    into llama.cpp's rotary layout, GPT-2's Conv1D weights transposed)."""
    import gguf
    import numpy as np
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_exp.pipelines.gguf_file import permute

    model_dir = request.getfixturevalue(arch)
    adapter = _trained(tmp_path, model_dir, toy_data)
    out = tmp_path / "gguf"
    proc = run_cli("export", "--model-path", str(adapter), "--out", str(out), "--format", "gguf",
                   "--gguf-dtype", "f32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    kind = "llama" if arch == "tiny_llama" else "gpt2"
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == kind
    assert int(reader.fields[f"{kind}.block_count"].parts[-1][0]) == 2
    tensors = {t.name: t for t in reader.tensors}
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).merge_and_unload()
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == merged.config.vocab_size  # one token per row
    sd = merged.state_dict()
    if kind == "llama":
        cfg = merged.config
        assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.attn_q.weight",
                "blk.1.attn_k.weight", "blk.1.ffn_gate.weight", "blk.1.ffn_down.weight"} <= set(tensors)
        q = sd["model.layers.1.self_attn.q_proj.weight"].numpy()
        got = np.asarray(tensors["blk.1.attn_q.weight"].data).reshape(q.shape)
        np.testing.assert_allclose(got, permute(q, cfg.num_attention_heads), atol=1e-6)
        assert not np.allclose(got, q)  # really permuted
        down = sd["model.layers.0.mlp.down_proj.weight"].numpy()
        np.testing.assert_allclose(np.asarray(tensors["blk.0.ffn_down.weight"].data).reshape(down.shape), down,
                                   atol=1e-6)
    else:
        assert {"token_embd.weight", "position_embd.weight", "output.weight", "blk.0.attn_qkv.weight",
                "blk.0.attn_qkv.bias", "blk.1.ffn_up.weight", "output_norm.bias"} <= set(tensors)
        qkv = sd["transformer.h.0.attn.c_attn.weight"].numpy()  # Conv1D: (in, out)
        np.testing.assert_allclose(np.asarray(tensors["blk.0.attn_qkv.weight"].data).reshape(qkv.T.shape), qkv.T,
                                   atol=1e-6)
    assert not any(name.endswith(("attn.bias", "masked_bias")) and "attn_" not in name for name in tensors)


def test_adapter_export_is_what_vllm_loads_and_refuses_what_it_cannot_serve(tmp_path, tiny_llama, toy_data):
    import json

    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    adapter = _trained(tmp_path / "lm", tiny_llama, toy_data)
    out = tmp_path / "vllm"
    proc = run_cli("export", "--model-path", str(adapter), "--out", str(out), "--format", "adapter", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["base_model_name_or_path"]) == (
        "LORA", "CAUSAL_LM", str(tiny_llama))
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())  # noqa: SIM118 - a safetensors file is not iterable
    assert keys and all(k.startswith("base_model.model.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    ids = torch.tensor([[5, 17, 42, 9, 33, 2]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapter)(ids).logits
        got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out)(ids).logits
    assert torch.allclose(got, want)

    head = _trained(tmp_path / "cls", tiny_llama, toy_data, formulation="classifier")
    refused = run_cli("export", "--model-path", str(head), "--out", str(tmp_path / "no"), "--format", "adapter",
                      cwd=tmp_path)
    assert refused.returncode == 2 and "task head" in refused.stdout + refused.stderr and not (tmp_path / "no").exists()
    dora = _trained(tmp_path / "dora", tiny_llama, toy_data, method={"name": "lora", "r": 4, "use_dora": True})
    refused = run_cli("export", "--model-path", str(dora), "--out", str(tmp_path / "no"), "--format", "adapter",
                      cwd=tmp_path)
    assert refused.returncode == 2 and "DoRA" in refused.stdout + refused.stderr
