"""The C allocator of a job's process (lora_exp.core.allocator): which one a job gets, and that the program
really restarts itself on it. The memory it buys is measured in tests/test_memplan.py."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_exp.core import allocator, tags
from lora_exp.core.errors import UserError
from support import experiment, mlflow_client, run_cli, write_values


@pytest.fixture
def clean_env(monkeypatch):
    """No allocator choice or preload inherited from the shell running the tests."""
    monkeypatch.delenv(allocator.ENV, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    return {"LD_PRELOAD": "", allocator.ENV: "auto"}


@pytest.mark.parametrize(("choice", "installed", "gpu", "preload", "expected"), [
    ("auto", True, False, "", "tcmalloc"),
    ("auto", False, False, "", "system"),
    ("auto", True, True, "", "system"),  # GPU jobs keep their allocator (and their images are not changed)
    ("auto", True, False, "/usr/lib/libjemalloc.so.2", "system"),  # the user's own allocator stays
    ("auto", True, False, "libfoo.so", "tcmalloc"),
    ("", True, False, "", "tcmalloc"),
    ("system", True, False, "", "system"),
    ("tcmalloc", True, True, "", "tcmalloc"),  # asked for: also on a GPU node
    ("TCMalloc", True, False, "", "tcmalloc"),
])
def test_the_allocator_a_job_gets(monkeypatch, choice: str, installed: bool, gpu: bool, preload: str,
                                  expected: str):
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator, "library", lambda: "libtcmalloc_minimal.so.4" if installed else None)
    monkeypatch.setattr(allocator, "_gpu_present", lambda: gpu)
    monkeypatch.setenv(allocator.ENV, choice)
    monkeypatch.setenv("LD_PRELOAD", preload)
    assert allocator.wanted() == expected


@pytest.mark.parametrize(("choice", "message"), [
    ("tcmalloc", "apt-get install libtcmalloc-minimal4"),
    ("jemalloc", "expected one of auto, tcmalloc, system"),
])
def test_an_allocator_that_cannot_be_had_is_a_user_error(monkeypatch, choice: str, message: str):
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator, "library", lambda: None)
    monkeypatch.setenv(allocator.ENV, choice)
    with pytest.raises(UserError, match=message):
        allocator.wanted()


@pytest.mark.parametrize(("argv", "program"), [
    (["python3", "-m", "lora_exp", "train"], True),
    (["/venv/bin/python", "-u", "-X", "faulthandler", "-m", "lora_exp", "train"], True),  # torchrun's workers
    (["/venv/bin/python", "/venv/bin/lora-exp", "plan"], True),  # the console script
    (["python3", "-m", "pytest", "tests"], False),
    (["python3", "host.py", "lora-exp"], False),  # another program calling cli.main()
    (["python3", "-"], False),
    (["python3"], False),
])
def test_only_the_program_itself_is_restarted(monkeypatch, argv: list[str], program: bool):
    monkeypatch.setattr(allocator.sys, "orig_argv", argv)
    assert allocator.is_program() is program


def test_restart_preloads_tcmalloc_once_and_gives_children_the_environment_back(monkeypatch, clean_env):
    """The restart keeps the interpreter, its options and the arguments, puts tcmalloc in front of an existing
    LD_PRELOAD and quiets its large-allocation reports. The restarted process never restarts again (where the
    dynamic linker dropped LD_PRELOAD it would, forever) and puts LD_PRELOAD back as it was, for its children."""
    calls = []
    monkeypatch.setattr(allocator, "wanted", lambda: allocator.TCMALLOC)
    monkeypatch.setattr(allocator, "in_use", lambda: allocator.SYSTEM)
    monkeypatch.setattr(allocator, "library", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator.os, "execve", lambda path, args, env: calls.append((path, args, env)))
    monkeypatch.setattr(allocator.sys, "orig_argv", ["python3", "-X", "faulthandler", "-m", "lora_exp", "train"])
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    allocator.reexec()
    ((path, args, env),) = calls
    assert path == allocator.sys.executable and args == [path, "-X", "faulthandler", "-m", "lora_exp", "train"]
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libother.so"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 2**40
    for key, value in env.items():  # now be the restarted process, whose linker dropped the preload
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LD_PRELOAD")
    allocator.reexec()
    assert len(calls) == 1
    assert allocator.os.environ["LD_PRELOAD"] == "libother.so" and allocator._RESTARTED not in allocator.os.environ

    def refuse(*_):
        raise OSError("no")

    monkeypatch.setattr(allocator.os, "execve", refuse)
    allocator.reexec()  # a restart that cannot be made leaves the job on glibc, running


def test_in_use_is_the_allocator_the_process_started_with(clean_env):
    """Preloaded at start: tcmalloc. Loaded later (ctypes), the process's malloc is still glibc's: system."""
    if allocator.library() is None:
        pytest.skip("tcmalloc is not installed")
    code = "from lora_exp.core import allocator; print(allocator.in_use())"
    late = f"import ctypes; ctypes.CDLL({allocator.library()!r}); {code}"
    for env, snippet, expected in (({"LD_PRELOAD": allocator.library()}, code, "tcmalloc"), ({}, code, "system"),
                                   ({}, late, "system")):
        proc = subprocess.run([sys.executable, "-c", snippet], env={**os.environ, **clean_env, **env},
                              capture_output=True, text=True, check=True)
        assert proc.stdout.split()[-1] == expected, (env, snippet, proc.stdout, proc.stderr)


def test_a_command_run_inside_another_program_is_not_restarted(monkeypatch, clean_env, tiny_gpt2: Path, toy_data,
                                                               tmp_path: Path):
    from lora_exp import cli

    def execve(*_):
        raise AssertionError("restarted")

    monkeypatch.setattr(allocator.os, "execve", execve)
    monkeypatch.setattr(allocator.sys, "orig_argv", ["python3", "-m", "lora_exp", "plan"])  # even if it looks so
    values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path))
    assert cli.main(["plan", "-f", str(values)]) == 0


def test_a_cpu_job_restarts_itself_on_tcmalloc(clean_env, tiny_gpt2: Path, toy_data, tmp_path: Path):
    """A real `python -m lora_exp train`: its log and its run's tag name the allocator it ran on, which is
    tcmalloc where installed, glibc when told so; a bad choice exits 2 before anything is read."""
    doc = experiment(tiny_gpt2, toy_data, tmp_path, training={"max_steps": 1, "eval_strategy": "no",
                                                              "save_strategy": "no"})
    values = write_values(tmp_path, doc)
    want = allocator.wanted()
    for env, expected in ((clean_env, want), ({**clean_env, allocator.ENV: "system"}, allocator.SYSTEM)):
        proc = run_cli("train", "-f", str(values), "--restart", env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        line = "CPU allocator: tcmalloc" if expected == allocator.TCMALLOC else "CPU allocator: glibc malloc"
        assert line in proc.stdout + proc.stderr
        client = mlflow_client(tmp_path)
        (run,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id], max_results=1,
                                    order_by=["attributes.start_time DESC"])
        assert run.data.tags[tags.ALLOCATOR] == expected
    proc = run_cli("train", "-f", str(values), env={**clean_env, allocator.ENV: "jemalloc"})
    assert proc.returncode == 2 and "LORA_EXP_ALLOCATOR='jemalloc'" in proc.stderr + proc.stdout


def test_plan_judges_cpu_profiles_on_the_job_images_allocator(monkeypatch, clean_env, tiny_gpt2: Path, toy_data,
                                                             tmp_path: Path, caplog):
    """Wherever the plan runs (a workstation without tcmalloc), a CPU profile's pod runs on the image's."""
    from lora_exp import cli

    monkeypatch.setattr(allocator, "in_use", lambda: allocator.SYSTEM)
    caplog.set_level(logging.INFO)
    values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path))
    assert cli.main(["plan", "-f", str(values), "--profile", "cpu"]) == 0
    assert "CPU allocator tcmalloc" in caplog.text
    caplog.clear()
    monkeypatch.setenv(allocator.ENV, "system")
    assert cli.main(["plan", "-f", str(values), "--profile", "cpu"]) == 0
    assert "CPU allocator glibc malloc" in caplog.text
