"""The HTML report: self-contained, shows the table, the pictures, the revival matrix and the curves,
and loads in a real browser (headless Chromium) without console errors.

Chromium is Debian's `chromium` package (`apt-get install -y chromium`); the browser test is skipped,
saying so, where it is not installed.
"""

import base64
import io
import json
import re
import shutil
import subprocess

import pytest
import torch
from PIL import Image

from sculpt.report import ReportError, write_report
from test_eval import make_run, toy_evaluate

IMG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A two-stage run evaluated in its eval/ folder, and a separate evaluation of its first stage."""
    from sculpt.models.tiny import tiny_pipeline

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    pipe = tiny_pipeline(seed=0)
    run = make_run(root / "run", pipe)
    toy_evaluate(pipe, run=run, out=run / "eval", cache=root / "cache")
    toy_evaluate(pipe, patches=[run / "stages" / "01-cat.safetensors"], out=root / "stage1", cache=root / "cache")
    torch.set_num_threads(n)
    return root, run, root / "stage1"


def pictures(page: str) -> list[tuple[str, Image.Image]]:
    """(alt text, decoded PNG) of every embedded picture; a broken PNG raises."""
    found = []
    for alt, data in IMG.findall(page):
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()
        found.append((alt, image))
    return found


def alts(page: str) -> set[str]:
    return {alt for alt, _ in pictures(page)}


def test_report_is_self_contained_with_table_grids_revival_and_curves(sources, tmp_path):
    root, run, stage1 = sources
    out = write_report([run, stage1], tmp_path / "report.html")
    page = out.read_text(encoding="utf-8")
    assert "<script" not in page and "<link" not in page and not re.search(r'(src|href)="(?!data:)', page)
    pics = pictures(page)
    assert page.count("<img") == len(pics)  # every picture is an embedded PNG that decodes
    assert {"cat", "car", "dog", "revival matrix", "training curves", "forgetting vs preservation",
            "cat across sources", "car across sources"} <= {alt for alt, _ in pics}
    table = page[page.index("<table>"):page.index("</table>")]
    for cell in ("original model", ">run<", ">stage1<", "Total Acc", "kept acc", "synonym acc", "held-out acc",
                 "coherence", "CLIP", "FID", "KID", "unsafe"):
        assert cell in table
    assert "No concept came back" in page


def test_a_revived_concept_shows_in_the_report(sources, tmp_path):
    _, run, _ = sources
    ev = tmp_path / "revived"
    shutil.copytree(run / "eval", ev)
    m = json.loads((ev / "metrics.json").read_text())
    # Stage results by hand: cat erased at stage 1 (0%) is back at 80% after stage 2.
    m["revival"].update(accuracy=[[0.9, 0.0, 0.8], [0.7, 0.7, 0.0]],
                        revived=[{"concept": "cat", "stage": 2, "accuracy": 0.8, "after_erasure": 0.0}])
    (ev / "metrics.json").write_text(json.dumps(m))
    page = write_report([ev], tmp_path / "r.html").read_text()
    assert "Revived" in page and "cat</li>" not in page
    assert re.search(r"<li>cat: 0\.0% after its erasure, 80\.0% after stage 2</li>", page)
    assert "revival matrix" in alts(page)


def test_a_run_without_evaluation_still_reports_its_curves(sources, tmp_path):
    _, run, _ = sources
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "metrics.jsonl", bare)
    page = write_report([bare], tmp_path / "r.html").read_text()
    assert alts(page) == {"training curves"}
    with pytest.raises(ReportError, match="neither an evaluation folder"):
        write_report([tmp_path], tmp_path / "x.html")


def test_report_command_writes_the_page(sources, tmp_path, capsys):
    import argparse

    from sculpt.eval.commands import add_commands

    _, run, stage1 = sources
    parser = argparse.ArgumentParser(prog="sculpt")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(run), str(stage1), "--out", str(tmp_path / "cli.html")])
    assert args.func(args) == 0
    assert (tmp_path / "cli.html").stat().st_size > 10_000 and "wrote" in capsys.readouterr().out


# What the browser runs after the page has loaded: count the pictures that decoded, flag the others.
CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0);
  imgs.filter(i => !ok.includes(i)).forEach(i => console.error("broken picture: " + i.alt));
  const d = document.createElement("div");
  d.id = "sculpt-check";
  d.textContent = `pictures ${ok.length}/${imgs.length} tables ${document.querySelectorAll("table").length}`;
  document.body.appendChild(d);
});
</script>"""


def test_report_loads_in_headless_chromium_without_console_errors(sources, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); browser check skipped")
    _, run, stage1 = sources
    page = write_report([run, stage1], tmp_path / "report.html").read_text(encoding="utf-8")
    n_pictures = page.count("<img")
    # The check runs on a copy: the report itself carries no script.
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", CHECK + "</body>"), encoding="utf-8")
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console  # no script error, no broken picture
    check = re.search(r'<div id="sculpt-check">([^<]*)</div>', result.stdout)
    assert check, result.stdout[-2000:]
    loaded, total, tables = map(int, re.fullmatch(r"pictures (\d+)/(\d+) tables (\d+)", check.group(1)).groups())
    assert loaded == total == n_pictures >= 10  # every picture decoded and has a size
    assert tables >= 1


def test_an_attack_folder_shows_its_success_rates_intervals_and_pictures(tmp_path):
    folder = tmp_path / "attack"
    folder.mkdir()
    Image.new("RGB", (8, 4), (200, 10, 10)).save(folder / "attack_grid.png")
    rate = {"rate": 0.44, "successes": 22, "n": 50, "interval": [0.312, 0.577]}
    (folder / "attack.json").write_text(json.dumps({
        "format": "sculpt-attack/1", "n": 50, "seed": 0, "files": {"grid": "attack_grid.png"},
        "attacks": {"textual-inversion": {"description": "d", "budget": {"steps": 300}}},
        "concepts": {"poodle": {"plain": {"model": {"rate": 0.0, "interval": [0.0, 0.071]},
                                          "base": {"rate": 0.9, "interval": [0.79, 0.96]}},
                                "attacks": {"textual-inversion": {"model": rate, "base": {"rate": 0.68}}}}},
    }))
    html = (write_report([folder], tmp_path / "r.html")).read_text()
    section = html[html.index("Under attack"):]
    assert "44.0 [31.2-57.7]" in section and "base 68.0" in section and "steps=300" in section
    assert any(alt == "adversarial pictures" for alt, _ in IMG.findall(section))
