"""`deconvnet reproduce --quick` end to end: killed mid-way, rerun without redoing finished steps,
and the report opened in headless Chromium with every section and image loaded."""
import html
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from deconvnet.report import OFFLINE, SECTIONS

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Run reproduce --quick, SIGKILL it when the 4th step starts, rerun; returns (dir, rerun stdout)."""
    out = tmp_path_factory.mktemp("report")
    command = [sys.executable, "-m", "deconvnet.cli", "reproduce", "--quick", "--out", str(out)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in first.stdout:
        if line.startswith("[4/"):
            first.send_signal(signal.SIGKILL)
            break
    first.wait()
    assert first.returncode == -signal.SIGKILL, "reproduce ended before it could be killed"
    assert not (out / "index.html").exists()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    return out, rerun.stdout


def test_rerun_skips_finished_steps(report):
    out, stdout = report
    status = dict(re.findall(r"^\[\d+/\d+\] (\S+)\s+(cached|running)", stdout, re.M))
    assert status["train"] == status["fig2"] == status["fig4"] == "cached"
    assert status["fig5"] == "running" and status["table7"] == "running"
    assert len(status) == 13
    records = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/step.json")}
    assert set(records) == set(status)


def test_every_section_has_real_numbers(report):
    out, _ = report
    page = (out / "index.html").read_text()
    for label, _title, step, json_name, _paper in SECTIONS:
        assert f">{label}: " in page, label
        if label in OFFLINE:
            continue
        if json_name:
            result = json.loads((out / step / json_name).read_text())
            findings = result["findings"]
            assert findings, f"{label}: no findings in {json_name}"
            section = page[page.index(f">{label}: "):]
            section = section[:section.index("</section>")]
            for f in findings:  # each reading is in the page, written from the section's own numbers
                assert f["reading"] and html.escape(f["reading"]) in section, label
            # the verdict cells, in order, are the findings' values
            cells = re.findall(r"<td class=(held|not|none)>", section)
            assert cells == [{True: "held", False: "not", None: "none"}[f["held"]] for f in findings], label
    assert page.count("<img") >= 10
    train = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert f"{100 * train[-1]['val_top1']:.2f}%" in page


def test_report_loads_in_headless_chromium(report, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (`make test` installs it when run as root with apt-get)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    out, _ = report
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto((out / "index.html").as_uri())
        page.wait_for_load_state("load")
        sections = page.eval_on_selector_all("section h2", "nodes => nodes.map(n => n.textContent)")
        images = page.eval_on_selector_all("img", "nodes => nodes.map(n => n.complete && n.naturalWidth > 0)")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        browser.close()
    assert [s.split(":")[0] for s in sections] == [s[0] for s in SECTIONS] + ["Run"]
    assert images and all(images)


def test_a_changed_step_starts_afresh_an_interrupted_one_resumes(tmp_path, capsys):
    """A budget change must not --resume the old run (its arguments differ); an interruption must."""
    from deconvnet.reproduce import Step, run_step

    def step(epochs):
        return Step("t", ["train", "--model", "zfnet-small", "--data", "digits", "--limit", "64",
                          "--batch-size", "32", "--epochs", str(epochs), "--no-ten-crop", "--out", "t"])

    def interrupt():  # what a kill after the last checkpoint leaves: started.json, no final.pt or step.json
        key = json.loads((tmp_path / "t" / "step.json").read_text())["key"]
        (tmp_path / "t" / "started.json").write_text(json.dumps({"key": key}))
        (tmp_path / "t" / "final.pt").unlink()
        (tmp_path / "t" / "step.json").unlink()

    run_step(step(1), tmp_path, "quick", "[1/1]")
    assert not (tmp_path / "t" / "started.json").exists()  # only an unfinished step keeps it
    interrupt()
    run_step(step(2), tmp_path, "quick", "[1/1]")  # another budget: trains afresh, 2 epochs
    assert json.loads((tmp_path / "t" / "config.json").read_text())["epochs"] == 2
    first = (tmp_path / "t" / "metrics.jsonl").read_text()
    interrupt()
    record = run_step(step(2), tmp_path, "quick", "[1/1]")  # same budget: resumes, nothing to redo
    assert (tmp_path / "t" / "metrics.jsonl").read_text() == first and record["seconds"] < 30
    capsys.readouterr()
    run_step(step(2), tmp_path, "quick", "[1/1]")
    assert "cached" in capsys.readouterr().out


def test_demo_steps_are_sized_from_one_measured_speed():
    """Fast machines keep the reference sizes, slow ones shrink the training steps; the estimates add up
    to the budget, and the commands carry the sizes."""
    from deconvnet.reproduce import OVERHEAD, plan, size_demo

    for train_rate, eval_rate in [(20000, 20000), (4100, 3500), (1200, 1400), (500, 700), (329, 518)]:
        demo = size_demo({"train_images_per_s": train_rate, "eval_images_per_s": eval_rate}, minutes=20)
        assert sum(demo["estimates"].values()) + OVERHEAD <= 20 * 60, (train_rate, demo)
        if train_rate >= 1200:  # the main training keeps the larger part
            assert demo["sizes"]["train"] >= 0.45 * 20, (train_rate, demo)
    fast = size_demo({"train_images_per_s": 4100, "eval_images_per_s": 3500})["sizes"]
    slow = size_demo({"train_images_per_s": 1200, "eval_images_per_s": 1400})["sizes"]
    assert slow["table3"] < fast["table3"] <= 20000 and slow["tables4-5"] < fast["tables4-5"] <= 300
    steps = {s.name: s.argv for s in plan("fashion-mnist", "zfnet-small", "default", slow)}
    assert steps["train"][-4:] == ["--time-budget", f"{slow['train']:g}", "--out", "train"]
    assert "--time-budget" in steps["fig6-alexnet"] and steps["table3"][-4:-2] == ["--limit", str(slow["table3"])]
    assert "--time-budget" not in plan("fashion-mnist", "zfnet-small", "quick")[0].argv


def test_a_code_edit_redoes_only_the_steps_that_run_it(tmp_path, monkeypatch):
    """Issue 13: an edit to occlusion.py changes the Fig. 7 step's key and not the training's."""
    from deconvnet import reproduce
    from deconvnet.reproduce import Step, step_key

    package = tmp_path / "deconvnet"
    shutil.copytree(reproduce.PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__", "static"))
    monkeypatch.setattr(reproduce, "PACKAGE", package)
    steps = {name: Step(name, argv) for name, argv in [
        ("train", ["train", "--model", "zfnet-small", "--out", "train"]),
        ("fig2", ["topk", "--checkpoint", "train/final.pt", "--out", "fig2"]),
        ("fig7", ["occlude", "--checkpoint", "train/final.pt", "--out", "fig7"])]}
    before = {name: step_key(step, tmp_path) for name, step in steps.items()}
    (package / "occlusion.py").write_text((package / "occlusion.py").read_text() + "\n# an edit\n")
    after = {name: step_key(step, tmp_path) for name, step in steps.items()}
    assert after["fig7"] != before["fig7"]
    assert after["train"] == before["train"] and after["fig2"] == before["fig2"]
    (package / "data.py").write_text((package / "data.py").read_text() + "\n# an edit\n")
    assert all(step_key(step, tmp_path) != after[name] for name, step in steps.items())  # everyone reads data
