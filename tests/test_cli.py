"""The `cfg-lab` command (cfg/cli.py): installed as a console script, its verbs call dvc, the search and the
analysis with this environment's tools, overrides are validated before anything runs."""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cfg import cli
from tests.conftest import ROOT

CFG_LAB = Path(sys.executable).parent / "cfg-lab"


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # nothing activated: the command finds its own tools
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(
        [str(CFG_LAB), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_console_script_is_installed_and_lists_the_daily_verbs():
    out = run_cli("--help", cwd=ROOT / "analysis")  # from a subfolder of the project too
    assert out.returncode == 0, out.stderr
    for verb in ("repro", "exp", "compare", "ui", "notebook", "lab", "search", "plots", "bench"):
        assert f"    {verb} " in out.stdout, verb
    ui = run_cli("ui", "--help")  # handed to the MLflow UI's own entry point (cfg.study.tracking)
    assert ui.returncode == 0 and "--port" in ui.stdout, ui.stderr


def test_repro_with_overrides_is_a_validated_exp_run(monkeypatch, capsys):
    monkeypatch.chdir(ROOT / "cfg")
    assert cli.main(["repro", "--dry-run"]) == 0
    assert capsys.readouterr().out.strip() == "dvc repro"
    assert cli.main(["repro", "--dry-run", "-S", "sample.steps=16", "-S", "sample.w=[0, 1]"]) == 0
    assert capsys.readouterr().out.strip() == "dvc exp run -S sample.steps=16 -S 'sample.w=[0, 1]'"
    assert cli.main(["exp", "run", "--dry-run", "--queue", "--preset", "presets/fashion_mnist_gpu.yaml"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("dvc exp run --queue -S data.name=fashion_mnist"), shown


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-S", "sample.steps=1"], "sample.steps = 1 is out of range: allowed value >= 2"),
        (["-S", "sample.stepz=8"], "sample.stepz"),
        (["-S", "sample.steps"], "-S 'sample.steps' is not KEY=VALUE"),
        (["-S", "sample.w.x=1"], "-S sample.w.x: sample.w is [-1.0, 0.0"),
        (["--preset", "presets/none.yaml"], "preset 'presets/none.yaml' not found"),
    ],
)
def test_bad_overrides_stop_before_dvc_runs(args, message, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as stop:
        cli.main(["repro", "--dry-run", *args])
    assert message in str(stop.value)
    assert "dvc exp run" not in capsys.readouterr().out


# `-S` values whose meaning DVC's Hydra grammar would change: a mapping (DVC merges it into the one there, or
# refuses its new keys), a string with `,` (a sweep) or `=` (an error). Each is what cfg-lab checks, what `dvc exp
# run -S` writes and what `repro --parallel` writes: the value replaces what was there.
AWKWARD_SETS = {
    "new guidance entries": ["sample.guidance={cfg: {}, interval: {}}"],
    "metrics without their options": ["evaluate.metrics=[fid, is]", "evaluate.metric_options={}"],
    "no sampler options": ["sample.sampler_options={}"],
    "a comma": ["data.root=/data/a,b"],
    "an equals sign": ["tracking.experiment=study w=2"],
    "an exponent": ["sample.w=[0.0, 1e-5]"],  # a float to DVC (YAML 1.2, Hydra), not the string '1e-5'
}


def _exp_project(root: Path) -> Path:
    """A git + DVC project of params.yaml and one stage reading it: the pipeline `dvc exp run` applies -S to."""
    root.mkdir()
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    (root / "dvc.yaml").write_text(
        "stages:\n  look:\n    cmd: cp params.yaml seen.yaml\n    params: [sample]\n"
    )
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (
        ["git", "init", "-q"],
        [DVC, "init", "-q"],
        [*git, "add", "-A"],
        [*git, "commit", "-qm", "p"],
    ):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    return root


DVC = str(Path(sys.executable).parent / "dvc")


@pytest.mark.parametrize("sets", AWKWARD_SETS.values(), ids=AWKWARD_SETS.keys())
def test_an_override_means_what_cfg_lab_checked_in_dvc(sets, tmp_path):
    """The `-S` flags cfg-lab passes to `dvc exp run`, applied by DVC's own code (`dvc.utils.hydra`, what
    `dvc exp run -S` runs on params.yaml, sweep detection included), give params.yaml as cfg-lab validated it:
    every key set to its value, a mapping replaced."""
    import yaml
    from dvc.utils.hydra import apply_overrides, to_hydra_overrides

    from cfg.io import load_yaml
    from cfg.study.presets import exp_run_command, merged_params, parse_set

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    overrides = parse_set(sets)
    checked = merged_params(yaml.safe_load(params.read_text()), overrides)
    cmd = exp_run_command(overrides, params_file=params)  # validated: else ParamsError
    flags = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-S"]
    assert not [f for f in to_hydra_overrides(flags) if f.is_sweep_override()], f"a sweep: {flags}"
    apply_overrides(str(params), flags)
    written = load_yaml(params.read_text())
    assert written == checked
    for key, value in overrides.items():
        node = written
        for part in key.split("."):
            node = node[part]
        assert node == value, key


def test_a_preset_can_empty_a_mapping_or_add_an_entry_with_its_defaults():
    from cfg.study.presets import flat_overrides

    preset = {"sample": {"sampler_options": {}, "guidance": {"interval": {}, "rescale": {"phi": 0.7}}}}
    assert flat_overrides(preset) == {
        "sample.sampler_options": {},
        "sample.guidance.interval": {},
        "sample.guidance.rescale.phi": 0.7,
    }


@pytest.mark.slow
def test_dvc_exp_run_and_repro_parallel_write_what_cfg_lab_checked(tmp_path):
    """Every awkward -S at once through a real `dvc exp run` (the command cfg-lab prints and runs) and through a
    real `cfg-lab repro --parallel` (its stages copy params.yaml as they see it): both end with the same
    params.yaml, byte for byte (DVC's writer: comments kept), whose values are the ones cfg-lab checked."""
    import yaml

    from cfg.io import load_yaml
    from cfg.study.presets import exp_run_command, merged_params, parse_set

    sets = [s for group in AWKWARD_SETS.values() for s in group]
    overrides = parse_set(sets)
    checked = merged_params(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    env.pop("MLFLOW_TRACKING_URI", None)

    exp = _exp_project(tmp_path / "exp")
    cmd = exp_run_command(overrides, params_file=exp / "params.yaml")
    out = subprocess.run(cmd, cwd=exp, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    by_dvc = (exp / "params.yaml").read_text()
    assert load_yaml(by_dvc) == checked
    assert (exp / "seen.yaml").read_text() == by_dvc, "the stage ran on it"

    par = tmp_path / "parallel"  # one arm, on CPU, copying params.yaml
    par.mkdir()
    stages = {"train": {"foreach": ["0.1"], "do": {"cmd": "cp params.yaml seen.yaml"}}}
    (par / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (par / "params.yaml").write_text(
        (ROOT / "params.yaml").read_text().replace("device: auto", "device: cpu", 1)
    )
    subprocess.run([DVC, "init", "-q", "--no-scm"], cwd=par, check=True)
    args = [a for s in sets for a in ("-S", s)]
    out = subprocess.run(
        [str(CFG_LAB), "repro", "--parallel", *args],
        cwd=par,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (par / "params.yaml").read_text() == by_dvc.replace("device: auto", "device: cpu", 1)
    assert (par / "seen.yaml").read_text() == (par / "params.yaml").read_text()


def test_outside_a_project_the_command_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="is not inside a cfg-lab project"):
        cli.main(["repro", "--dry-run"])


def test_exp_show_keeps_the_columns_worth_reading():
    out = run_cli("exp", "show", "--csv")
    assert out.returncode == 0, out.stderr
    header = next(csv.reader(io.StringIO(out.stdout)))
    assert {"best_fid", "best_fid_w", "sample.w", "train.p_uncond"} <= set(header)
    assert set(header) <= set(cli.EXP_SHOW_KEEP) and len(header) <= len(cli.EXP_SHOW_KEEP)


def test_the_search_script_applies_overrides_before_validating(monkeypatch):
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("search_script", ROOT / "pipelines" / "search.py")
    search = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(search)
    monkeypatch.chdir(ROOT)
    args = argparse.Namespace(set=["search.seed=7", "train.steps=120"], n_trials=5)
    s = search._spec("params.yaml", args)
    assert (s.search.n_trials, s.search.seed, s.params.train.steps) == (5, 7, 120)
    with pytest.raises(SystemExit, match="search.n_trials = 0 is out of range"):
        search._spec("params.yaml", argparse.Namespace(set=["search.n_trials=0"], n_trials=None))


@pytest.mark.slow
def test_search_takes_overrides_and_validates_them(tmp_path):
    out = run_cli("search", "--no-inputs", "--n-trials", "0", "--out-dir", str(tmp_path))
    assert out.returncode != 0
    assert "search.n_trials = 0 is out of range" in out.stderr, out.stderr
    out = run_cli("search", "--no-inputs", "-S", "search.objective=fidd", "--out-dir", str(tmp_path))
    assert out.returncode != 0 and "search.objective" in out.stderr and "fidd" in out.stderr, out.stderr


def test_the_offline_page_inlines_the_vega_scripts_and_dvc_uses_it(tmp_path, monkeypatch):
    vega = tmp_path / "vega"
    vega.mkdir()
    for name in cli.VEGA_PACKAGES:  # stand-ins: what is checked is where they go, not vega itself
        (vega / f"{name}.min.js").write_text(f"/* {name} */ var x = '</script>';")
    page = cli.offline_template(cli.vega_scripts(vega))
    assert page.count("<script>") == 3 and "<\\/script>" in page and "{plot_divs}" in page
    assert "cdn" not in page.lower()
    project = tmp_path / "project"
    project.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=project, check=True)
    shutil.copytree(ROOT / ".dvc" / "plots", project / ".dvc" / "plots")
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    shutil.copytree(ROOT / "results", project / "results", ignore=shutil.ignore_patterns("cells"))
    monkeypatch.chdir(project)
    assert cli.main(["plots", "--vega-dir", str(vega), "-o", "out"]) == 0
    html = (project / "out" / "index.html").read_text()
    assert "cdn.jsdelivr" not in html and "/* vega-lite */" in html
    for plot in ("fid_vs_w", "is_vs_w", "fid_vs_is"):
        assert f'id = "{plot}"' in html, plot
    assert '"type": "symlog"' in html, "w on a symlog axis"


def test_lab_without_jupyterlab_says_how_to_install_it(monkeypatch):
    if shutil.which("jupyter-lab", path=str(Path(sys.executable).parent)):
        pytest.skip("JupyterLab is installed here")
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit, match=r"install -e '\.\[notebook\]'"):
        cli.main(["lab"])


# ---------------------------------------------------------------------------------------------------------
# Slow: on the real tiny pipeline (tests/test_analysis.py's session study) and the real vega scripts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tests.test_analysis import tiny_study

    return tiny_study(tmp_path_factory)


@pytest.mark.slow
def test_the_daily_verbs_on_a_real_study(tiny):
    tracked = (ROOT / "analysis" / "tradeoff.ipynb").read_bytes()
    out = run_cli("notebook", cwd=tiny)
    assert out.returncode == 0, out.stderr
    executed = tiny / "results" / "notebook" / "tradeoff.ipynb"
    assert executed.stat().st_size > 10 * len(tracked), "the copy holds the outputs"
    assert (tiny / "analysis" / "tradeoff.ipynb").read_bytes() == tracked, "the tracked notebook stays clean"
    status = subprocess.run(["git", "status", "--porcelain"], cwd=tiny, capture_output=True, text=True).stdout
    assert "tradeoff.ipynb" not in status and "results/notebook" not in status, status

    same = run_cli("compare", cwd=tiny)  # the committed baseline against the workspace: the same run
    assert same.returncode == 0 and same.stdout.rstrip().endswith("REPRODUCED"), same.stdout + same.stderr
    shown = run_cli("exp", "show", "--csv", cwd=tiny)
    assert shown.returncode == 0 and "wide-w" in shown.stdout, shown.stderr


@pytest.mark.slow
def test_plots_render_offline_in_a_browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not (shutil.which("npm") and chromium):
        pytest.skip("needs npm (to fetch the vega builds once) and chromium")
    out = run_cli("plots", "-o", str(tmp_path / "plots"))
    assert out.returncode == 0, out.stderr
    page = tmp_path / "plots" / "index.html"
    assert "cdn.jsdelivr" not in page.read_text()
    dom = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    # every trade-off plot drawn by vega-embed from the inlined scripts (file://, no network)
    assert dom.count('class="marks"') >= 3, dom[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("jupyter-lab", path=str(Path(sys.executable).parent)) is None,
    reason="JupyterLab not installed (the notebook extra)",
)
def test_lab_serves_the_project_and_opens_the_notebook_with_this_environments_kernel():
    """`cfg-lab lab` (as root too: --allow-root) serves the project root, the notebook's contents and a python3
    kernel whose interpreter is this environment's."""
    import json
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "cfg-lab"), "lab", "--no-browser", f"--port={port}"]
    proc = subprocess.Popen(
        [*cmd, "--ServerApp.token=t"], cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(
                    f"{base}/api/contents/analysis/tradeoff.ipynb?content=0&token=t"
                ) as r:
                    nb = json.load(r)
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.5)
        else:
            raise AssertionError("JupyterLab did not answer within 60 s")
        assert nb["path"] == "analysis/tradeoff.ipynb" and nb["type"] == "notebook"
        with urllib.request.urlopen(f"{base}/api/kernelspecs?token=t") as r:
            specs = json.load(r)
        argv = specs["kernelspecs"][specs["default"]]["spec"]["argv"]
        # the kernel runs this interpreter: "python" resolves through jupyter's own sys.executable
        assert argv[0] in ("python", sys.executable) and "ipykernel_launcher" in argv
    finally:  # cfg-lab and the jupyter-lab it started: the whole process group
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_exp_subcommands_keep_their_flags_and_dvcs_own_flags_reach_dvc(project, monkeypatch, capfd):
    # the exp parser took --name/--queue/--temp/--all for exp run and show, and dropped them for other subcommands
    # (exp save --name baseline saved under a random name); abbreviations turned DVC's --dry into --dry-run
    monkeypatch.chdir(project)
    for argv, printed in (
        (["exp", "save", "--name", "baseline"], "dvc exp save --name baseline"),
        (["exp", "remove", "--queue"], "dvc exp remove --queue"),
        (["exp", "diff", "--all", "HEAD"], "dvc exp diff --all HEAD"),
    ):
        assert cli.main([*argv, "--dry-run"]) == 0
        assert capfd.readouterr().out.strip() == printed
    with pytest.raises(SystemExit, match=r"-S/--preset apply to `cfg-lab exp run` .*not `exp save`"):
        cli.main(["exp", "save", "-S", "train.steps=3"])
    # `repro --dry` is DVC's dry run (real dvc): it names the stages it would run and runs none
    capfd.readouterr()
    assert cli.main(["repro", "--dry", "inputs"]) == 0
    out = capfd.readouterr().out
    assert "Running stage 'inputs'" in out and "> python pipelines/inputs.py" in out, out
    assert not (project / "data" / "inputs").exists()


def test_an_override_that_dvc_would_write_otherwise_is_refused_naming_only_it():
    # DVC writes `experiment: on` unquoted, which params.yaml's readers take for True; the refusal listed every key
    # of params.yaml (dotted search.space keys among them) instead of the one override
    from cfg.study.config import ParamsError
    from cfg.study.presets import dvc_applied, parse_set

    with pytest.raises(
        ParamsError,
        match=r"^DVC would not apply the overrides as given: tracking\.experiment = True, not 'on'$",
    ):
        dvc_applied(ROOT / "params.yaml", parse_set(["tracking.experiment='on'", "train.steps=3"]))
