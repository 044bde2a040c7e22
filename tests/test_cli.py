"""The `hetero` command: version/help, generate and chat on the demo model, and one-line errors
with exit code 2 for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def hetero(*args: str, stdin: str | None = None, env_cache=None) -> subprocess.CompletedProcess:
    env = None
    if env_cache is not None:
        import os

        env = dict(os.environ, HETERO_CACHE=str(env_cache))
    return subprocess.run(
        [sys.executable, "-m", "hetero", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
        env=env,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    # the load log may come first ("hetero: N modules on the CPU kernels ..."); the error is
    # the one line that says error, and the last
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("hetero: error:")]
    assert errors == lines[-1:], result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in errors[0]


def test_version_and_help():
    version = hetero("--version")
    assert version.returncode == 0 and version.stdout.startswith("hetero ")
    help_text = hetero("--help")
    assert help_text.returncode == 0
    for command in ("generate", "chat", "demo"):
        assert command in help_text.stdout


@pytest.mark.parametrize("command", [[], ["serve"], ["generate"], ["bench"]])
def test_help_answers_without_importing_torch(command):
    probe = (
        "import sys\nfrom hetero.cli import main\ntry: main([*sys.argv[1:], '--help'])\n"
        "except SystemExit: pass\nsys.exit(3 if 'torch' in sys.modules else 0)"
    )
    done = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True)
    assert done.returncode == 0, f"`hetero {' '.join(command)} --help` imported torch"


def test_generate_on_the_demo_model(tmp_path):
    result = hetero("generate", "demo", "--prompt", "hello", "-n", "8", env_cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "8 generated" in result.stderr


def test_generate_chat_with_sampling(tmp_path):
    args = ["generate", "demo", "--chat", "--prompt", "hi", "-n", "6", "--temperature", "0.8"]
    a = hetero(*args, "--seed", "5", env_cache=tmp_path)
    b = hetero(*args, "--seed", "5", env_cache=tmp_path)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout


def test_chat_session_commands(tmp_path):
    script = "hello\n/system be brief\nhi there\n/reset\n/exit\n"
    result = hetero("chat", "demo", "-n", "5", stdin=script, env_cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("generated") == 2
    assert "conversation cleared" in result.stderr


def test_demo_writes_a_loadable_checkpoint(tmp_path):
    result = hetero("demo", str(tmp_path / "d"))
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe"
    size = sum(f.stat().st_size for f in (tmp_path / "d").iterdir())
    assert size < 16 * 1024 * 1024


def test_missing_directory_is_one_line_exit_2(tmp_path):
    assert_one_line_error(
        hetero("generate", str(tmp_path / "nope"), "--prompt", "x"), "does not exist"
    )


def test_truncated_weights_are_one_line_exit_2(checkpoint_factory):
    path, _ = checkpoint_factory("qwen3")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    assert_one_line_error(hetero("generate", str(path), "--prompt", "x"), "truncated")


def test_missing_weights_are_one_line_exit_2(checkpoint_factory):
    path, _ = checkpoint_factory("qwen3")
    (path / "model.safetensors").unlink()
    assert_one_line_error(hetero("generate", str(path), "--prompt", "x"), "safetensors")


def test_unsupported_model_type_is_one_line_exit_2(checkpoint_factory):
    path, _ = checkpoint_factory("qwen3")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "rwkv"
    (path / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(hetero("generate", str(path), "--prompt", "x"), "rwkv")


def test_prompt_longer_than_context_is_one_line_exit_2(checkpoint_factory):
    path, _ = checkpoint_factory("qwen3")  # max_position_embeddings 256
    assert_one_line_error(
        hetero("generate", str(path), "--prompt", "word " * 400), "max_position_embeddings"
    )


def test_generate_with_sparse_attention_over_a_sized_context(tmp_path):
    args = ["--context-length", "512", "--sparse-attention", "1/16", "--kv-dtype", "bf16"]
    result = hetero("generate", "demo", "--prompt", "hello", "-n", "4", *args, env_cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "KV cache: 512 tokens x 1 sequence" in result.stderr
    assert "(bf16)" in result.stderr
    assert "sparse decode attention: 1/16 of the pages" in result.stderr


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--sparse-attention", "0"], "--sparse-attention"),
        (["--sparse-attention", "sixteenth"], "--sparse-attention"),
        (["--sparse-attention", "3/2"], "--sparse-attention"),
        (["--context-length", "128", "--sparse-attention", "4096"], "exceeds the context"),
        (["--context-length", "1000"], "exceeds the 256 positions"),
    ],
)
def test_bad_context_or_sparse_budget_is_one_line_exit_2(checkpoint_factory, args, fragment):
    path, _ = checkpoint_factory("qwen3")  # max_position_embeddings 256
    assert_one_line_error(hetero("generate", str(path), "--prompt", "x", *args), fragment)


@pytest.mark.parametrize("flag", [["--temperature", "-1"], ["--top-p", "0"], ["-n", "-3"]])
def test_invalid_sampling_values_are_one_line_exit_2(tmp_path, flag):
    assert_one_line_error(
        hetero("generate", "demo", "--prompt", "x", *flag, env_cache=tmp_path), "must be"
    )


def test_bench_measures_a_saved_plan_against_its_prediction(tmp_path):
    plan = tmp_path / "plan.json"
    made = hetero("plan", "demo", "--save", str(plan), env_cache=tmp_path)
    assert made.returncode == 0, made.stderr
    args = ["bench", "demo", "--placements", f"plan:{plan}", "-p", "16", "-n", "4"]
    args += ["--repeat", "1", "--peers", "none", "--out", str(tmp_path / "out")]
    result = hetero(*args, env_cache=tmp_path)
    assert result.returncode == 0, result.stderr
    row = json.loads((tmp_path / "out" / "results.json").read_text())["rows"][0]
    assert [t["test"] for t in row["tests"]] == ["pp16", "tg4"]
    assert all(t["median"] > 0 and t["predicted_tok_s"] > 0 and t["bound"] for t in row["tests"])


def test_bench_row_says_a_plan_file_is_missing(tmp_path):
    args = ["bench", "demo", "--placements", f"plan:{tmp_path / 'none.json'}", "--peers", "none"]
    result = hetero(*args, "--out", str(tmp_path / "out"), env_cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "does not exist" in result.stdout
