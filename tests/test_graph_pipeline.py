"""The whole pipeline on a graph model a user would bring: a residual block, PReLU, MaxPool with
ceil_mode, two outputs and a final Softmax, from ONNX. verify (IBP, CROWN, attacks), replay of
every witness, batch and report; model.output and explanation.output: probability."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from verigrad.cli import main
from verigrad.reports import ExitCode


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c0 = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.PReLU(4)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.aux = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        h = self.act(self.c0(x))
        h = torch.relu(self.c1(h) + h)  # residual
        h = self.pool(h).flatten(1)  # 7x7 → 4x4: ceil_mode matters
        return torch.softmax(self.fc(h), dim=1), self.aux(h)


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("graph_pipeline")
    net = _Net().eval()
    torch.onnx.export(net, (torch.zeros(2, 1, 7, 7),), str(d / "net.onnx"), dynamo=False, input_names=["input"],
                      output_names=["probs", "aux"], dynamic_axes={"input": {0: "batch"}})
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 7, 7, generator=g).numpy()
    np.savez(d / "inputs.npz", x=x, y=np.array([0, 1, 2]))
    return d


def _spec(d: Path, name: str, **model) -> Path:
    spec = {
        "model": {"path": str(d / "net.onnx"), **model},
        "data": {"path": str(d / "inputs.npz")},
        "explanation": {"output": "probability"},
        "perturbation": {"input": {"epsilon": 0.02}},
        "properties": [
            {"name": "tight", "kind": "untargeted", "metric": "l2", "threshold": 1e-4},
            {"name": "loose", "kind": "untargeted", "metric": "l2", "threshold": 1e3},
        ],
        "bounds": {"methods": ["ibp", "crown"]},
        "attack": {"order": "after", "methods": ["pgd"], "steps": 10, "restarts": 1},
        "general": {"results": str(d / f"res_{name}")},
    }
    p = d / f"{name}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_several_outputs_need_model_output(files):
    r = _run("verify", _spec(files, "no_output"))
    assert r.exit_code == 2, r.output
    line = r.output.strip().splitlines()[-1]
    assert "probs" in line and "aux" in line and "model.output" in line


@pytest.mark.slow
def test_verify_replay_batch_report_on_a_graph_model(files):
    spec = _spec(files, "probs", output="probs")
    r = _run("verify", spec)
    assert r.exit_code == 1, r.output  # the tight property is falsified by a witness, none is an error
    doc = json.loads((files / "res_probs/probs.json").read_text())
    inst = doc["instances"]
    assert len(inst) == 3 and all(not i.get("error") for i in inst)
    assert all(i["verdicts"]["loose"] == "certified" for i in inst)
    assert any(i["verdicts"]["tight"] == "falsified" for i in inst)
    model = doc["model"]
    assert model["chain"] is False and {"add", "maxpool", "prelu"} <= set(model["operators"])
    assert any("Softmax" in n for n in model["notes"]) and model["classes"] == 3
    witnesses = sorted((files / "res_probs").glob("*.witnesses/*.npz"))
    assert witnesses
    for w in witnesses:
        assert _run("replay", w).exit_code == ExitCode.FALSIFIED
    out = files / "batch"
    rb = _run("batch", spec, "--jobs", 1, "--max-inputs", 1, "--timeout", 300, "--out", out)
    assert rb.exit_code == 1, rb.output
    assert _run("report", files / "res_probs/probs.json").exit_code == 0


def test_output_by_index_selects_the_second_output(files):
    spec = _spec(files, "aux", output=1)
    d = yaml.safe_load(spec.read_text())
    d["explanation"]["output"] = "logit"
    d["attack"]["order"] = "skip"
    spec.write_text(yaml.safe_dump(d))
    r = _run("verify", spec)  # label 2 of the third input does not exist for the 2-class head
    assert r.exit_code == 2 and "input 2 has label 2, out of range" in r.output, r.output
    r = _run("verify", spec, "--end", "2")
    assert r.exit_code in (0, 3), r.output
    doc = json.loads((files / "res_aux/aux.json").read_text())
    assert all(i["prediction"] in (0, 1) for i in doc["instances"])  # the aux head has 2 classes
