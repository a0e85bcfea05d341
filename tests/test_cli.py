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
