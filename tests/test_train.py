"""`hetero train` end to end on a tiny Qwen3-MoE over a Q8_0 base: it writes an adapter that
`--adapter` and PEFT load, a loss log and its plot; a run stopped after a checkpoint and
resumed has the same losses as an uninterrupted one; bad lines are counted and reported;
bad input gets one line and exit 2."""

from __future__ import annotations

import json

import pytest
import torch

import hetero
import hetero.train.loop
from hetero.cli import main
from hetero.runtime.adapters import CONFIG_FILE, WEIGHTS_FILE

LINES = [
    {
        "messages": [
            {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "hello, friend"},
        ]
    },
    {"text": "the quick brown fox jumps over the lazy dog"},
    {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
    {"text": "a stitch in time saves nine"},
]


def write_data(path, bad_lines: int = 0):
    rows = [json.dumps(r) for r in LINES] + ["{not json"] * bad_lines
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def tiny(checkpoint_factory, tmp_path):
    directory, reference = checkpoint_factory("qwen3_moe")
    return directory, reference, write_data(tmp_path / "data.jsonl", bad_lines=1)


def train_args(directory, data, out, *extra):
    return [
        "train",
        str(directory),
        "--data",
        str(data),
        "--out",
        str(out),
        "--quant",
        "q8_0",
        "--seq-len",
        "48",
        "--batch-tokens",
        "64",
        "--lr",
        "1e-2",
        "--save-every",
        "2",
        "--recompute",
        "on",
        *extra,
    ]


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]


def test_train_writes_an_adapter_peft_loads_with_the_same_logits(tiny, tmp_path, capsys):
    directory, reference, data = tiny
    out = tmp_path / "run"
    assert main(train_args(directory, data, out, "--steps", "4")) == 0
    err = capsys.readouterr().err
    assert "1 lines left out: line 5" in err
    assert (out / WEIGHTS_FILE).is_file() and (out / CONFIG_FILE).is_file()
    assert (out / "loss.png").stat().st_size > 0
    assert len(losses(out)) == 4 and losses(out)[-1] < losses(out)[0]

    ids = list(range(3, 40))
    model = hetero.load(directory, quant="none", adapter=out, progress=False)
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(reference, out)
    with torch.no_grad():
        want = peft_model(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(model.logits(ids), want, rtol=1e-4, atol=1e-4)
    plain = hetero.load(directory, quant="none", progress=False).logits(ids)
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter changed something

    merged = tmp_path / "merged"
    assert main(["merge", str(directory), "--adapter", str(out), str(merged)]) == 0
    torch.testing.assert_close(
        hetero.load(merged, quant="none", progress=False).logits(ids), want, rtol=1e-4, atol=1e-4
    )


def test_resumed_run_continues_the_same_loss_curve(tiny, tmp_path, monkeypatch):
    directory, _, data = tiny
    whole = tmp_path / "whole"
    assert main(train_args(directory, data, whole, "--steps", "5")) == 0

    # stopped during step 4: the log holds steps 1-3, the checkpoint step 2
    calls = {"n": 0}
    real = hetero.train.loop.batch_loss

    def stop_in_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(hetero.train.loop, "batch_loss", stop_in_step_4)
    stopped = tmp_path / "stopped"
    assert main(train_args(directory, data, stopped, "--steps", "5")) == 130
    assert len(losses(stopped)) == 3
    monkeypatch.setattr(hetero.train.loop, "batch_loss", real)
    assert main(train_args(directory, data, stopped, "--steps", "5")) == 2  # no --resume
    assert main(train_args(directory, data, stopped, "--steps", "5", "--resume")) == 0
    assert losses(stopped) == losses(whole)


def one_line_error(capsys, fragment):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("hetero: error:") and fragment in lines[-1], err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "content, extra, fragment",
    [
        (None, [], "does not exist"),
        ("", [], "is empty"),
        ("just text\nmore text\n", [], "no usable example"),
        ('{"text": "x"}\n', ["--lora-rank", "0"], "rank must be >= 1"),
        ('{"text": "x"}\n', ["--targets", "attention,mlp"], "targets must be some of"),
    ],
    ids=["missing", "empty", "not-jsonl", "rank-0", "unknown-target"],
)
def test_bad_training_input_is_one_line_and_exit_2(
    tiny, tmp_path, capsys, content, extra, fragment
):
    directory, _, _ = tiny
    data = tmp_path / "bad.jsonl"
    if content is not None:
        data.write_text(content)
    assert main(train_args(directory, data, tmp_path / "out", "--steps", "1", *extra)) == 2
    one_line_error(capsys, fragment)


def test_an_adapter_for_another_model_is_refused(checkpoint_factory, tiny, tmp_path, capsys):
    directory, _, data = tiny
    out = tmp_path / "run"
    assert main(train_args(directory, data, out, "--steps", "1")) == 0
    other, _ = checkpoint_factory("mixtral")
    capsys.readouterr()
    assert main(["generate", str(other), "--prompt", "hi", "-n", "1", "--adapter", str(out)]) == 2
    one_line_error(capsys, "made for another model")
