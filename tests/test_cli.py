"""Issue 21, part 6: flags and key=value arguments in any order, as in Ultralytics' own CLI (parser calls only)."""

from __future__ import annotations

import pytest

from raytrain_yolo import fit, predict, tune, val

pytestmark = pytest.mark.quick


def test_fit_takes_key_values_after_flags():
    ns = fit.build_parser().parse_args(["--cpu", "model=yolo26n.yaml", "--name", "r", "epochs=1"])
    assert ns.overrides == ["model=yolo26n.yaml", "epochs=1"] and ns.name == "r" and ns.use_gpu is False


def test_val_takes_key_values_after_flags():
    ns = val.build_parser().parse_args(["model=best.pt", "--num-workers", "2", "data=d.yaml", "--output", "m.json",
                                        "split=test"])
    assert ns.overrides == ["model=best.pt", "data=d.yaml", "split=test"]
    assert ns.num_workers == 2 and ns.output == "m.json"


def test_predict_takes_the_readme_example():
    # README: `... model=... source=... --output /data/preds conf=0.4 batch=32`
    ns = predict.build_parser().parse_args(["--gpu", "model=best.pt", "source=/data/images", "--output",
                                            "/data/preds", "conf=0.4", "batch=32"])
    assert ns.overrides == ["model=best.pt", "source=/data/images", "conf=0.4", "batch=32"]
    assert ns.output == "/data/preds" and ns.use_gpu is True


def test_tune_takes_key_values_after_flags():
    ns = tune.build_parser().parse_args(["epochs=1", "--batch", "8,16", "imgsz=64", "--cpu", "data=d.yaml"])
    assert ns.overrides == ["epochs=1", "imgsz=64", "data=d.yaml"] and ns.batch == [8, 16] and ns.use_gpu is False


@pytest.mark.parametrize("module", [fit, val, predict, tune])
def test_mistakes_stay_one_line(module, capsys):
    for argv, words in ((["--cpu", "--gpu", "a=1"], "not allowed with argument --cpu"),
                        (["a=1", "--bogus", "b=2"], "unrecognized arguments: --bogus")):
        with pytest.raises(SystemExit) as e:
            module.build_parser().parse_args(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def readme_commands() -> list[tuple[str, list[str]]]:
    """Every `python -m raytrain_yolo.<job> ...` line in README.md's indented code blocks (continuation lines
    joined, trailing comments dropped), as (job, argv). A lone `...` (more arguments) is dropped; a command with a
    `<placeholder>` is left out."""
    import shlex
    from pathlib import Path

    lines, out = (Path(__file__).parents[1] / "README.md").read_text().splitlines(), []
    i = 0
    while i < len(lines):
        line = lines[i]
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i].strip()
        i += 1
        if not line.startswith("    ") or "python -m raytrain_yolo." not in line:
            continue
        text = line.split("python -m raytrain_yolo.", 1)[1]
        words = [w for w in shlex.split(text, comments=True) if w != "..."]
        if any("<" in w for w in words):
            continue
        out.append((words[0], words[1:]))
    return out


def test_every_readme_command_parses():
    """The README's commands are what users paste first: each parses with its job's own parser, and its
    key=value arguments are Ultralytics' form (what runs them is tested elsewhere; this keeps an example from
    drifting away from the parser, as the predict example with arguments after --output once did)."""
    import importlib

    from raytrain_yolo.core.config import parse_key_values

    commands = readme_commands()
    assert {job for job, _ in commands} >= {"fit", "val", "predict", "tune"}, commands
    for job, argv in commands:
        module = importlib.import_module(f"raytrain_yolo.{job}" + (".cli" if job == "bench" else ""))
        ns = module.build_parser().parse_args(argv)
        parse_key_values(getattr(ns, "overrides", []) or [])


@pytest.mark.quick
def test_a_failed_job_names_itself(capsys):
    """Issue 40: val and predict failures said "training failed"; each job's one line names the job."""
    from raytrain_yolo.core.cli import run_main

    def fails() -> int:
        raise RuntimeError("the source went away")

    for job in ("val", "predict"):
        assert run_main(fails, False, job=job) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: {job} failed: RuntimeError: the source went away"), err
