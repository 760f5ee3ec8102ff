"""``verigrad train``: config validation, a short run that exports a model verigrad loads
and a verification spec that runs, and the per-epoch log."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from verigrad.cli import main
from verigrad.models import load_model
from verigrad.training.trainer import build_model, train, train_config_from_dict

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def _cfg(tmp_path, **over) -> dict:
    d = {
        "model": {"input_shape": [1, 28, 28], "architecture": {"kind": "fc", "hidden": [16], "activation": "softplus"}},
        "data": {"dataset": "mnist_sample", "start": 0, "end": 40},
        "optimizer": {"epochs": 2, "batch_size": 20, "lr": 0.003},
        "regularizer": {"name": "gradcert", "weight": 0.1, "epsilon": 0.01},
        "general": {"name": "tiny", "results": str(tmp_path / "out"), "progress": False},
    }
    d.update(over)
    return d


def test_config_errors_name_the_key(tmp_path):
    bad = _cfg(tmp_path, regularizer={"name": "dropout"})
    with pytest.raises(ValueError, match="regularizer.name"):
        train_config_from_dict(bad)
    with pytest.raises(ValueError, match="optimizer.epochs"):
        train_config_from_dict(_cfg(tmp_path, optimizer={"epochs": 0}))
    with pytest.raises(ValueError, match="model.input_shape"):
        train_config_from_dict(_cfg(tmp_path, model={"input_shape": [784], "architecture": {"kind": "cnn"}}))
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_cfg(tmp_path, optimizer={"batch": 3})))
    r = CliRunner().invoke(main, ["train", str(p)])
    assert r.exit_code == 2 and "optimizer" in r.output and "batch" in r.output


@pytest.mark.parametrize("kind", ["fc", "cnn"])
def test_built_models_are_what_verigrad_verifies(kind, tmp_path):
    cfg = train_config_from_dict(_cfg(tmp_path, model={"input_shape": [1, 28, 28],
                                                   "architecture": {"kind": kind, "hidden": [8], "channels": [2, 3]}}))
    m = build_model(cfg.model)
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_train_exports_a_model_a_spec_and_a_log(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_cfg(tmp_path)))
    r = CliRunner().invoke(main, ["train", str(p)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    log = json.loads((out / "tiny.train.json").read_text())["log"]
    assert [row["epoch"] for row in log] == [1, 2]
    assert all(row["certified_box_l2"] > 0 and 0 <= row["train_accuracy"] <= 1 for row in log)
    # the exported model is the trained one, as verigrad loads it
    cfg = train_config_from_dict(_cfg(tmp_path))
    res_model = load_model(out / "tiny.onnx", (1, 28, 28))
    assert res_model.num_classes == 10
    v = CliRunner().invoke(main, ["verify", str(out / "tiny.verify.yaml"), "--end", "2", "--method", "ibp"])
    assert v.exit_code in (0, 1, 3), v.output
    assert cfg.regularizer.epsilon == 0.01


def test_train_is_reproducible(tmp_path):
    a = train(train_config_from_dict(_cfg(tmp_path / "a")))
    b = train(train_config_from_dict(_cfg(tmp_path / "b")))
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_an_unwritable_results_directory_fails_before_training(tmp_path, monkeypatch):
    import verigrad.training.trainer as tmod

    (tmp_path / "plain").write_text("x")
    cfg = _cfg(tmp_path, general={"name": "tiny", "results": str(tmp_path / "plain" / "out"), "progress": False})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))

    def no_training(*a, **k):
        raise AssertionError("training must not start")

    monkeypatch.setattr(tmod, "training_loss", no_training)
    r = CliRunner().invoke(main, ["train", str(p)])
    assert r.exit_code == 2 and r.output.startswith("error: cannot write ") and "plain" in r.output, r.output
