"""``verigrad report``: the PNG encoder and colour maps, the HTML page of a verify results
file and of a batch directory (summary counts, pictures, witnesses, PNG files), bad input,
and (when Chromium is installed) that the page renders to a non-blank screenshot."""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from verigrad.cli import main
from verigrad.report_html import (DIVERGING_ANCHORS, NAN_COLOUR, SEQUENTIAL_ANCHORS, diverging, encode_png,
                                  sequential, write_report)

ROOT = Path(__file__).resolve().parents[1]
FC = str(ROOT / "examples/models/mnist_fc.onnx")
GERMAN = str(ROOT / "examples/models/german_fc_biased.onnx")
IMG = '<img src="data:image/png;base64,'
# a property name with HTML metacharacters: it must come out escaped everywhere
ODD = 'l2<&"x>'


def _spec(tmp_path: Path, name: str, threshold: float, methods=("ibp",), end: int = 2, odd: bool = False) -> Path:
    d = {"model": {"path": FC}, "data": {"dataset": "mnist_sample", "start": 0, "end": end},
         "perturbation": {"input": {"epsilon": 0.001}},
         "properties": [{"name": ODD if odd else "l2", "kind": "untargeted", "metric": "l2", "threshold": threshold},
                        {"name": "cos", "kind": "untargeted", "metric": "cosine", "threshold": 0.5}],
         "bounds": {"methods": list(methods)}, "attack": {"order": "after", "steps": 5, "restarts": 1},
         "general": {"results": str(tmp_path / "res")}}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _report(*args):
    return CliRunner().invoke(main, ["report", *map(str, args)])


class _Tables(HTMLParser):
    """Rows of every <table> (cell texts), keyed by the table's id (or its position)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._cur: list[list[str]] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._cur = self.tables.setdefault(dict(attrs).get("id") or f"t{len(self.tables)}", [])
        elif tag == "tr" and self._cur is not None:
            self._cur.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._cur is not None:
            self._cur[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._cur = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _tables(text: str) -> dict[str, list[list[str]]]:
    p = _Tables()
    p.feed(text)
    return p.tables


def _summary_counts(text: str) -> dict[str, dict[str, int]]:
    rows = _tables(text)["summary"]
    head = rows[0]
    return {r[0]: {v: int(r[head.index(v)]) for v in ("certified", "falsified", "unknown", "error")} for r in rows[1:]}


def _self_contained(text: str) -> None:
    assert "<script" not in text and "<link" not in text and "@import" not in text
    # the only URLs are SVG's namespace name (never fetched) and in-page anchors
    assert set(re.findall(r"https?://[^\"' )]+", text)) <= {"http://www.w3.org/2000/svg"}


# ---------------------------------------------------------------------------------------
# PNG and colour maps


def test_png_encoder_decodes_exactly_with_pillow():
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 3), (7, 5, 3), (28, 31, 3)]:
        a = rng.integers(0, 256, size=shape, dtype=np.uint8)
        data = encode_png(a)
        Image.open(io.BytesIO(data)).verify()  # chunk CRCs and structure
        im = Image.open(io.BytesIO(data))
        assert im.mode == "RGB" and im.size == (shape[1], shape[0])
        np.testing.assert_array_equal(np.asarray(im), a)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((4, 4, 3), np.float64), np.zeros((0, 4, 3), np.uint8)])
def test_png_encoder_rejects_what_it_cannot_encode(bad):
    with pytest.raises(ValueError):
        encode_png(bad)


def test_diverging_map_is_symmetric_around_the_white_midpoint():
    vmax = 2.5
    out = diverging(np.array([0.0, vmax, -vmax, 10 * vmax, -np.inf, np.nan, vmax / 2, -vmax / 2]), vmax)
    mid = DIVERGING_ANCHORS[len(DIVERGING_ANCHORS) // 2]
    np.testing.assert_array_equal(out[0], mid)
    np.testing.assert_array_equal(out[1], DIVERGING_ANCHORS[-1])  # +max: the red end
    np.testing.assert_array_equal(out[2], DIVERGING_ANCHORS[0])  # −max: the blue end
    np.testing.assert_array_equal(out[3], DIVERGING_ANCHORS[-1])  # beyond the scale: clipped
    np.testing.assert_array_equal(out[4], DIVERGING_ANCHORS[0])
    np.testing.assert_array_equal(out[5], NAN_COLOUR)
    np.testing.assert_array_equal(out[6], DIVERGING_ANCHORS[3])  # ±max/2: the anchors halfway out
    np.testing.assert_array_equal(out[7], DIVERGING_ANCHORS[1])
    # a map that is zero everywhere (vmax 0) is all midpoint, not NaN or an error
    np.testing.assert_array_equal(diverging(np.zeros(3), 0.0), np.tile(mid, (3, 1)))


def test_sequential_map_runs_dark_to_bright_and_clips():
    out = sequential(np.array([0.0, 1.0, 3.0, -1.0, np.nan]), 1.0)
    np.testing.assert_array_equal(out[0], SEQUENTIAL_ANCHORS[0])
    np.testing.assert_array_equal(out[1], SEQUENTIAL_ANCHORS[-1])
    np.testing.assert_array_equal(out[2], SEQUENTIAL_ANCHORS[-1])
    np.testing.assert_array_equal(out[3], SEQUENTIAL_ANCHORS[0])
    np.testing.assert_array_equal(out[4], NAN_COLOUR)
    lightness = sequential(np.linspace(0, 1, 50), 1.0).astype(float) @ [0.299, 0.587, 0.114]
    assert np.all(np.diff(lightness) > 0)  # a wider bound always looks brighter


# ---------------------------------------------------------------------------------------
# verify results


@pytest.fixture(scope="module")
def verified(tmp_path_factory) -> Path:
    """A verify run with ibp and crown on 2 MNIST inputs; the tiny l2 threshold is falsified
    on at least one input, so a witness file exists."""
    tmp = tmp_path_factory.mktemp("verify")
    spec = _spec(tmp, "fc", 1e-9, methods=("ibp", "crown"), odd=True)
    r = CliRunner().invoke(main, ["verify", str(spec)])
    assert r.exit_code == 1, r.output
    return tmp / "res" / "fc.json"


def test_report_of_verify_results(verified, tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    doc = json.loads(verified.read_text())
    out = tmp_path / "page.html"
    r = _report(verified, "--html", out)
    assert r.exit_code == 0, r.output
    assert str(out) in r.output
    text = out.read_text()
    _self_contained(text)
    # the summary table: every property with the JSON's best-of-engine counts (no errors here)
    counts = _summary_counts(text)
    want = {n: {**c, "error": 0} for n, c in doc["summary"]["per_property"].items()}
    assert counts == want
    assert counts[ODD]["falsified"] >= 1
    # the odd property name is escaped wherever it appears, never raw markup
    assert ODD not in text and "l2&lt;&amp;&quot;x&gt;" in text
    assert f"exit code {doc['summary']['exit_code']}:" in text
    # per instance: input, centre (on the bounds' scale and its own), 3 per engine, the 2 colour
    # scales; 6 per witness
    witnesses = [(i["index"], n) for i in doc["instances"] for n, a in i["attacks"].items() if a["witness"]]
    assert witnesses
    n_img = len(doc["instances"]) * (3 + 3 * len(doc["methods"]) + 2) + 6 * len(witnesses)
    assert text.count(IMG) == n_img
    assert text.count('class="witness"') == len(witnesses)
    assert "adversarial input x" in text and "input unavailable" not in text
    # the engine table and the IBP-vs-CROWN plots
    engines = {row[0]: row for row in _tables(text)["t1"][1:]}
    assert set(engines) == {"ibp", "crown"}
    assert float(engines["ibp"][3]) == pytest.approx(doc["summary"]["per_engine"]["ibp"]["mean_width"], rel=1e-3)
    assert text.count("<svg") >= 2 and "crown / ibp" in text
    # the PNG files: one per distinct picture (the scales once), each decodes and equals the embedded bytes
    files = sorted((tmp_path / "page_files").glob("*.png"))
    assert len(files) == n_img - 2 * (len(doc["instances"]) - 1)
    embedded = {base64.b64decode(m) for m in re.findall(r'data:image/png;base64,([A-Za-z0-9+/=]+)"', text)}
    for f in files:
        data = f.read_bytes()
        assert data in embedded
        im = Image.open(io.BytesIO(data))
        im.load()
        assert im.mode == "RGB" and min(im.size) >= 10


def test_report_default_path_and_instance_cap(verified):
    doc = json.loads(verified.read_text())
    r = _report(verified, "--max-instances", 1)
    assert r.exit_code == 0, r.output
    page = verified.with_suffix(".html")
    text = page.read_text()
    omitted = len(doc["instances"]) - 1
    assert f"1 shown, {omitted} omitted" in text
    assert text.count('class="instance"') == 1
    assert (verified.parent / "fc_files").is_dir()
    # the summary still counts every input
    assert sum(_summary_counts(text)["cos"].values()) == len(doc["instances"])


def test_input_unavailable_is_shown_not_fatal(verified, tmp_path):
    doc = json.loads(verified.read_text())
    doc["spec"]["resolved"]["data"] = {"dataset": None, "path": str(tmp_path / "gone.npz"), "start": 0, "end": 2}
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(doc))
    shutil.copy(verified.with_suffix(".npz"), moved.with_suffix(".npz"))
    r = _report(moved)
    assert r.exit_code == 0, r.output
    text = moved.with_suffix(".html").read_text()
    assert text.count("input unavailable") == len(doc["instances"])
    assert "explanation at the centre" in text  # the bound maps are still drawn


def test_moved_results_folder_still_finds_its_witnesses(verified, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(verified.parent, moved)
    doc = json.loads((moved / "fc.json").read_text())
    n = 0
    for inst in doc["instances"]:  # the absolute paths written by the run no longer exist
        for a in inst["attacks"].values():
            if a["witness"]:
                a["witness"] = str(Path("/nonexistent") / Path(a["witness"]).relative_to(verified.parent))
                n += 1
    (moved / "fc.json").write_text(json.dumps(doc))
    assert _report(moved / "fc.json").exit_code == 0
    text = (moved / "fc.html").read_text()
    assert text.count('class="witness"') == n and "witness file not found" not in text
    assert text.count("<b>adversarial input x</b>") == n


def test_tabular_inputs_are_bar_charts(tmp_path):
    d = {"model": {"path": GERMAN, "input_shape": [25]}, "data": {"dataset": "german_credit", "start": 800, "end": 802},
         "explanation": {"target": 1}, "perturbation": {"input": {"epsilon": 0.01}},
         "properties": [{"name": "sex", "kind": "feature_bound", "features": [0], "threshold": 0.5}],
         "bounds": {"methods": ["ibp"]}, "attack": {"order": "skip"}, "general": {"results": str(tmp_path)}}
    spec = tmp_path / "german.yaml"
    spec.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["verify", str(spec)])
    assert r.exit_code in (0, 3), r.output
    r = _report(tmp_path / "german.json")
    assert r.exit_code == 0, r.output
    text = (tmp_path / "german.html").read_text()
    assert text.count('class="bars"') == 2  # one bar chart per input
    assert text.count("certified intervals per feature") == 2
    assert text.count(IMG) == 2 * (2 + 3 + 2)  # centre (two scales), lower / upper / width strips, the 2 scales


# ---------------------------------------------------------------------------------------
# batch directories


@pytest.fixture(scope="module")
def batch_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("batch")
    ok, bad = _spec(tmp, "ok", 1000.0), _spec(tmp, "bad", 1e-9)
    out = tmp / "out"
    r = CliRunner().invoke(main, ["batch", str(ok), str(bad), "--jobs", "2", "--timeout", "120", "--out", str(out)])
    assert r.exit_code == 1, r.output
    return out


def test_report_of_batch_directory(batch_dir):
    r = _report(batch_dir)
    assert r.exit_code == 0, r.output
    index = batch_dir / "report.html"
    text = index.read_text()
    _self_contained(text)
    rows = {row[0]: row for row in _tables(text)["summary"][1:]}
    assert set(rows) == {"ok", "bad"}
    links = re.findall(r'<a href="([^"]+)">', text)
    assert sorted(links) == ["report_bad.html", "report_ok.html"]
    summary = json.loads((batch_dir / "summary.json").read_text())
    total = {v: 0 for v in summary["verdicts"]}
    for link in links:
        page = (batch_dir / link).read_text()
        _self_contained(page)
        for c in _summary_counts(page).values():
            for v, n in c.items():
                total[v] += n
        assert page.count('class="instance"') == 2
        assert (batch_dir / link.replace(".html", "_files")).is_dir()
    assert total == summary["verdicts"]
    bad = (batch_dir / "report_bad.html").read_text()
    assert 'class="witness"' in bad and "input unavailable" not in bad
    assert bad.count(IMG) >= 2 * (3 + 3 + 2) + 6


def test_batch_with_one_spec_timeouts_and_cut_lines(batch_dir, tmp_path):
    lines = [json.loads(x) for x in (batch_dir / "results.jsonl").read_text().splitlines()]
    ok = [x for x in lines if Path(x["spec"]).stem == "ok"]
    timed_out = {**ok[0], "data_index": 5, "status": "timeout", "reason": "timeout after 1 s", "result": None}
    text = "\n".join(json.dumps(x) for x in ok + [timed_out]) + "\n" + json.dumps(ok[0])[:40] + "\n"
    (tmp_path / "results.jsonl").write_text(text)
    page = tmp_path / "one.html"
    r = _report(tmp_path / "results.jsonl", "--html", page)  # the jsonl file itself works too
    assert r.exit_code == 0, r.output
    html = page.read_text()
    counts = _summary_counts(html)
    assert counts["l2"] == {"certified": 2, "falsified": 0, "unknown": 1, "error": 0}
    assert "timeout after 1 s" in html and "exit code 3:" in html
    assert html.count('class="instance"') == 3  # the timed-out input is listed, without pictures


# ---------------------------------------------------------------------------------------
# bad input


def test_bad_input_exits_2_naming_the_file(tmp_path, verified):
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"schema": "something/else"}))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("not json {")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    bad_lines = tmp_path / "lines"
    bad_lines.mkdir()
    (bad_lines / "results.jsonl").write_text(json.dumps({"hello": 1}) + "\n")
    witness = next(verified.parent.glob("fc.witnesses/*.npz"))
    for path, expected in [(tmp_path / "missing.json", "no such file"), (wrong, "verigrad.results/1"),
                           (garbage, "verigrad.results/1"), (empty_dir, "results.jsonl"),
                           (bad_lines, "results.jsonl"), (witness, "verigrad.results/1")]:
        r = _report(path)
        assert r.exit_code == 2, (path, r.output)
        assert isinstance(r.exception, SystemExit)  # a message, not a traceback
        assert str(path) in r.output and expected in r.output, r.output


def test_write_report_api_returns_pages(verified, tmp_path):
    pages = write_report(verified, tmp_path / "api.html", max_instances=0)
    assert pages == [tmp_path / "api.html"]
    assert "2 omitted" in pages[0].read_text()


# ---------------------------------------------------------------------------------------
# rendering


def _tool():
    spec = importlib.util.spec_from_file_location("check_report_render", ROOT / "tools" / "check_report_render.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_page_renders_in_headless_chromium(verified, tmp_path):
    pytest.importorskip("PIL")
    tool = _tool()
    chromium = tool.find_chromium()
    if chromium is None:
        pytest.skip("chromium not installed (Debian: apt-get install chromium): rendering not checked")
    page = tmp_path / "render.html"
    write_report(verified, page)
    png = tmp_path / "shot.png"
    proc = tool.screenshot(page, png, chromium, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert tool.check_screenshot(png) == []
    # the script's check fails on a page without pictures, so it can fail
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body><p>nothing</p></body></html>")
    assert tool.main([str(blank), "--png", str(tmp_path / "blank.png")]) == 1
    assert len(tool.check_screenshot(tmp_path / "blank.png", expect_heatmaps=True)) == 2


def test_text_table_keeps_every_column_when_a_row_is_short():
    from verigrad.reports import _table

    out = _table(["input", "engine", "p0", "p1"], [["0", "ibp", "certified", "unknown"], ["1", "ERROR: boom"]])
    head, _, full, short = out.splitlines()
    assert head.split() == ["input", "engine", "p0", "p1"]
    assert full.split() == ["0", "ibp", "certified", "unknown"]  # the short row no longer truncates it
    assert short.split() == ["1", "ERROR:", "boom"]
    assert full.index("certified") == head.index("p0") and full.index("unknown") == head.index("p1")
