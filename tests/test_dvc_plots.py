"""The DVC plot templates (.dvc/plots/, the `plots:` section of dvc.yaml) as the real `dvc plots show` fills them
and vega draws them: one line per (p_uncond, guidance method with its options), and with one method the lines,
colours and legend of one line per p_uncond, as before there was a guidance axis."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VEGA = ROOT / ".cache" / "vega"  # vega and vega-lite builds, fetched by `cfg-lab plots` (npm pack)
PLOTS = ("fid_vs_w", "is_vs_w", "fid_vs_is")

# per plot: the lines vega draws (series, stroke colour, w of each point in drawing order) and the legend
LINES_JS = """
const fs = require('fs');
const vega = require('vega');
const vl = require('./vega-lite.js');
(async () => {
  const shown = JSON.parse(fs.readFileSync(0, 'utf8'));
  const out = {};
  for (const [name, plots] of Object.entries(shown.data)) {
    const view = new vega.View(vega.parse(vl.compile(plots[0].content).spec), {renderer: 'none'});
    await view.runAsync();
    const lines = [], legend = {title: [], labels: []};
    const walk = (node) => {
      if (node.marktype === 'line' && node.items.length) {
        const first = node.items[0];
        lines.push([first.datum.series ?? null, first.stroke, node.items.map((i) => Number(i.datum.w))]);
      }
      if (node.role === 'legend-title') legend.title.push(...node.items.map((i) => i.text));
      if (node.role === 'legend-label') legend.labels.push(...node.items.map((i) => i.text));
      for (const child of node.items || []) walk(child);
    };
    walk(view.scenegraph().root);
    out[name] = {lines, legend};
  }
  console.log(JSON.stringify(out));
})();
"""


def _table(methods: list[tuple[str, dict]], p_values=(0.1, 0.5), w_values=(-1.0, -0.5, 0.0, 1.0, 4.0)):
    # a trade-off table's settings columns with made-up FID / IS, one row per (p_uncond, method, w)
    return pd.DataFrame(
        [
            {
                "p_uncond": p,
                "w": w,
                "guidance": g,
                "fid": 10 + w * w + p + k,
                "is": 5 + w + p - k / 10,
                "guidance_options": json.dumps(o, sort_keys=True),
            }
            for p in p_values
            for k, (g, o) in enumerate(methods)
            for w in w_values
        ]
    )


def _shown(project: Path, table: pd.DataFrame, templates: Path = ROOT / ".dvc" / "plots") -> dict:
    """`dvc plots show --json` of the trade-off plots on `table` with `templates`."""
    shutil.rmtree(project / ".dvc" / "plots", ignore_errors=True)
    shutil.copytree(templates, project / ".dvc" / "plots")
    table.to_csv(project / "results" / "tradeoff.csv", index=False)
    dvc = Path(sys.executable).parent / "dvc"
    out = subprocess.run(
        [str(dvc), "plots", "show", "--json", *PLOTS], cwd=project, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert "errors" not in shown, shown["errors"]
    return shown


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git + DVC project whose dvc.yaml is the `plots:` section of the real one (the stages need params.yaml)."""
    project = tmp_path / "project"
    (project / "results").mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=project, check=True)
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    return project


def _drawn(shown: dict, tmp_path: Path) -> dict:
    """What vega draws of each plot (LINES_JS), run by node on the vega builds of .cache/vega."""
    node = shutil.which("node")
    if node is None or not all((VEGA / f"{n}.min.js").is_file() for n in ("vega", "vega-lite")):
        pytest.skip("needs node and the vega builds in .cache/vega (`cfg-lab plots` fetches them)")
    run = tmp_path / "vega"
    (run / "node_modules" / "vega").mkdir(parents=True, exist_ok=True)
    shutil.copy(VEGA / "vega.min.js", run / "node_modules" / "vega" / "index.js")  # vega-lite requires 'vega'
    shutil.copy(VEGA / "vega-lite.min.js", run / "vega-lite.js")
    (run / "lines.js").write_text(LINES_JS)
    out = subprocess.run(
        [node, "lines.js"], cwd=run, input=json.dumps(shown), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_dvc_fills_the_templates_with_every_column_the_series_need(project):
    shown = _shown(project, _table([("cfg", {}), ("rescale", {"phi": 0.7})]))
    for plot in PLOTS:
        (content,) = [p["content"] for p in shown["data"][plot]]
        assert content["encoding"]["color"]["field"] == "series", plot
        row = content["data"]["values"][0]
        assert {"p_uncond", "w", "guidance", "guidance_options", "rev"} <= set(row), row


def test_vega_draws_one_line_per_p_uncond_and_guidance_method(project, tmp_path):
    methods = [("cfg", {}), ("rescale", {"phi": 0.7}), ("rescale", {"phi": 0.5})]
    drawn = _drawn(_shown(project, _table(methods)), tmp_path)
    names = ["cfg", "rescale phi=0.7", "rescale phi=0.5"]  # guidance_name: two variants of one method apart
    expected = [f"{p} · {m}" for p in ("0.1", "0.5") for m in names]
    for plot in PLOTS:
        lines = drawn[plot]["lines"]
        assert [series for series, _, _ in lines] == expected, plot
        assert all(w == [-1, -0.5, 0, 1, 4] for _, _, w in lines), f"{plot}: each line in w order: {lines}"
        assert len({stroke for _, stroke, _ in lines}) == len(expected), f"{plot}: one colour per line"
        assert sorted(drawn[plot]["legend"]["labels"]) == sorted(expected)


def test_one_method_looks_as_it_did_before_the_guidance_axis(project, tmp_path):
    """The templates before the guidance axis (git history) and now draw the same lines, colours and legend."""
    before = tmp_path / "before"
    before.mkdir()
    for name in ("w_by_p_uncond.json", "by_p_uncond.json"):
        blob = subprocess.run(
            ["git", "show", f"a7cdc17:.dvc/plots/{name}"], cwd=ROOT, capture_output=True, text=True
        )
        if blob.returncode != 0:
            pytest.skip("the templates' history is not in this checkout")
        (before / name).write_text(blob.stdout)
    # the default grid: the old FID-vs-IS template ordered by w as a string (-0.5 before -1), now fixed
    table = _table([("cfg", {})], p_values=(0.1, 0.2, 0.5), w_values=(-1.0, 0.0, 0.1, 0.3, 1.0, 4.0))
    now, then = _drawn(_shown(project, table), tmp_path), _drawn(_shown(project, table, before), tmp_path)
    for plot in PLOTS:
        assert [line[1:] for line in now[plot]["lines"]] == [line[1:] for line in then[plot]["lines"]], plot
        assert len(now[plot]["lines"]) == 3
        assert (
            now[plot]["legend"]
            == then[plot]["legend"]
            == {"title": ["p_uncond"], "labels": ["0.1", "0.2", "0.5"]}
        )
