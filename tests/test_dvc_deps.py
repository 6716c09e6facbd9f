"""dvc.yaml declares, for every stage, the library modules that compute its outputs, so editing one reruns it."""

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# modules that load and validate params, log to MLflow, resolve paths or write files: they do not change a
# stage's numbers (what maps params to library calls lives in the library: UNetConfig.from_params,
# training.train_kwargs, generate.sampler_options, metrics.extractor_by_name), and declaring them would rerun
# the whole study on every edit of the plumbing
PLUMBING = {
    "cfg/study/config.py",
    "cfg/study/stage.py",
    "cfg/study/tracking.py",
    "cfg/study/store.py",
    "cfg/study/queue.py",
    "cfg/io.py",
    "cfg/log.py",
    "cfg/progress.py",
}
# modules a stage uses for what it logs, not for the outputs later stages read: the train stage's FID curve
# (eval.csv, MLflow) samples and scores through cfg.engine.scoring, and declaring that would retrain every
# model whenever a sampler or metric changes. `dvc repro -f train@<p>` redraws a curve.
MONITORING = {"cfg/engine/scoring.py"}


def cfg_imports(path: Path, seen: set[str] | None = None) -> set[str]:
    """Every cfg module `path` imports, at module level or inside functions, and what those import in turn
    (not followed through PLUMBING: cfg.study.stage's extractor factory only dispatches to cfg.eval.metrics)."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cfg":
            names = [node.module] if node.module != "cfg" else [f"cfg.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("cfg.")]
        for name in names:
            rel = name.replace(".", "/") + ".py"
            if not (ROOT / rel).is_file():  # a package: its __init__.py
                rel = name.replace(".", "/") + "/__init__.py"
            if rel not in seen and (ROOT / rel).is_file():
                seen.add(rel)
                if rel not in PLUMBING | MONITORING:
                    cfg_imports(ROOT / rel, seen)
    return seen


def test_every_stage_declares_the_library_modules_it_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        script = stage["cmd"].split()[1]  # python pipelines/<stage>.py ...
        assert script in stage["deps"], f"stage {name} does not list its script {script}"
        need = cfg_imports(ROOT / script) - PLUMBING - MONITORING
        if need - set(stage["deps"]):
            missing[name] = sorted(need - set(stage["deps"]))
    assert not missing, f"dvc.yaml stages miss library deps: {missing}"


def test_the_import_walk_sees_function_level_imports_and_stops_at_plumbing():
    found = cfg_imports(ROOT / "pipelines" / "reference.py")
    assert "cfg/nets/inception.py" in found, "cfg.eval.metrics imports it inside a function"
    assert "cfg/study/stage.py" in found and "cfg/nets/unet.py" not in found, (
        "not followed through cfg.study.stage"
    )


def test_stage_scripts_call_no_mapping_in_the_plumbing():
    # a params -> library mapping in cfg/study/config.py would change numbers without rerunning the stage
    config = ast.parse((ROOT / "cfg" / "study" / "config.py").read_text())
    methods = {
        f.name
        for c in config.body
        if isinstance(c, ast.ClassDef)
        for f in c.body
        if isinstance(f, ast.FunctionDef) and not f.name.startswith("_")
    }
    assert not methods - {"section_hash", "to_dict"}, (
        f"public methods in cfg/study/config.py: {sorted(methods)}"
    )


def test_sample_stage_params_are_every_sample_key_but_the_process_count():
    # the sample stage lists its keys one by one to leave out sample.devices (the same bytes for any count):
    # a sample.* key added to the schema but not here would change samples without rerunning the stage
    import dataclasses

    import yaml

    from cfg.study.config import SampleParams

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    listed = {k for k in stages["sample"]["do"]["params"] if k.startswith("sample.")}
    assert listed == {f"sample.{f.name}" for f in dataclasses.fields(SampleParams)} - {"sample.devices"}
    assert "sample.devices" not in stages["evaluate"]["params"]


# what stage scripts may take from cfg/study/config.py besides its classes: `needs_guide` only reads
# sample.guidance into cfg.maths.guidance.needs_guide_network, which train_guide declares (with sample.guidance)
CONFIG_FUNCTIONS_IN_STAGES = {"needs_guide"}


def test_stage_scripts_take_no_mapping_from_the_config_module():
    """A module-level function of the config that a stage script calls would decide part of the stage's output
    outside its deps (as `guide_model`, the guide's network, did): only its classes and the names above, whether
    imported by name or reached through the module (`from cfg.study import config as c; c.guide_model`)."""
    config = ast.parse((ROOT / "cfg" / "study" / "config.py").read_text())
    forbidden = {f.name for f in config.body if isinstance(f, ast.FunctionDef)} - CONFIG_FUNCTIONS_IN_STAGES
    taken = {}
    for script in sorted((ROOT / "pipelines").glob("*.py")):
        tree = ast.parse(script.read_text())
        modules = set()  # names the script binds to the config module
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "cfg.study.config":
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module == "cfg.study":
                modules |= {a.asname or a.name for a in node.names if a.name == "config"}
            elif isinstance(node, ast.Import):
                modules |= {a.asname for a in node.names if a.name == "cfg.study.config" and a.asname}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in forbidden:
                base = node.value
                if (isinstance(base, ast.Name) and base.id in modules) or ast.unparse(
                    base
                ) == "cfg.study.config":
                    names.add(node.attr)
        if names & forbidden:
            taken[script.name] = sorted(names & forbidden)
    assert not taken, f"stage scripts call config functions: {taken}"
