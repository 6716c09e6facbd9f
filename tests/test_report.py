"""report.md's table and notes (cfg/study/report.py) on the committed trade-off table and small frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cfg.study.report import REPORT_COLUMNS, column_notes, markdown_table

ROOT = Path(__file__).resolve().parents[1]


def test_integers_print_as_integers_and_grid_values_as_written():
    df = pd.DataFrame(
        {
            "p_uncond": [0.1, 0.5],
            "w": [-1.0, 0.25],
            "fid": [67.93477, 8.4],
            "n_samples": [400, 400],
            "n_per_range": [200.0, np.nan],  # a float column of whole numbers, as a CSV with a gap reads it
            "ok": [True, False],
        }
    )
    lines = markdown_table(df, list(df.columns)).splitlines()
    assert lines[0] == "| p_uncond | w | fid | n_samples | n_per_range | ok |"
    assert lines[2] == "| 0.1 | -1 | 67.935 | 400 | 200 | True |"
    assert lines[3] == "| 0.5 | 0.25 | 8.400 | 400 | nan | False |"


def test_the_committed_table_prints_its_sample_counts_as_integers():
    df = pd.read_csv(ROOT / "results" / "tradeoff.csv")
    columns = [c for c in REPORT_COLUMNS if c in df]
    rows = [line.split(" | ") for line in markdown_table(df, columns).splitlines()[2:]]
    n = columns.index("n_samples")
    assert len(rows) == len(df) and {r[n].strip(" |") for r in rows} == {str(v) for v in df["n_samples"]}
    assert all("." not in r[n] for r in rows)


def test_notes_explain_the_kid_scale_and_the_seed_range_spread():
    df = pd.DataFrame(
        {
            "extractor": ["classifier"],
            "kid_x1e3": [103.07],
            "fid_range_std": [1.9],
            "n_samples": [400],
            "n_per_range": [200],
        }
    )
    notes = "\n".join(column_notes(df))
    assert "KID × 10³" in notes and "`classifier` features" in notes and "within its noise" in notes
    assert "over 2 disjoint seed ranges of 200 samples" in notes
    assert column_notes(df[["extractor"]]) == []


def test_a_degenerate_method_is_named_in_the_banner_table_and_metrics(tmp_path):
    """write_report on methods whose one absurd cell is degenerate (tests/test_frontier.py's study)."""
    import json
    from dataclasses import replace

    from cfg.study.report import write_report
    from tests.test_frontier import ABSURD, SOUND, _study

    detail = {"extractor": "classifier", "weights_hash": "w", "reference_hash": "r", "n_samples": 100}
    detail |= {"resolution": 8, "resize": "none"}
    records = [replace(r, fingerprint_detail=detail) for r in _study(SOUND | ABSURD)]
    out = {
        k: tmp_path / v
        for k, v in {"table": "t.csv", "metrics": "m.json", "plots": "plots", "report": "r.md"}.items()
    }
    write_report(records, grid_images={}, classifier_accuracy=0.99, data_name="digits", experiment="e", **out)
    report, metrics = out["report"].read_text(), json.loads(out["metrics"].read_text())
    assert report.startswith("> **Warning:** 1 of 9 cells are degenerate")
    assert "> - p_uncond=0.2 w=4 apg: class_acc 0.100 < 0.325: near chance" in report
    assert "| degenerate_w |" in report and "Reference point: p_uncond=0.2: FID 19.000, IS 3.000." in report
    apg = metrics["guidance_methods"]["apg p_uncond=0.2"]
    assert apg["degenerate_w"] == [4.0] and apg["hypervolume"] == pytest.approx(20 / 54)
    assert (apg["ref_fid"], apg["ref_is"]) == (19.0, 3.0)
    ((cell),) = metrics["degenerate_cells"]
    assert (cell["p_uncond"], cell["w"], cell["guidance"]) == (0.2, 4.0, "apg")


@pytest.mark.parametrize(
    "folder, data_name",
    [
        ("guidance_methods_digits", "digits"),
        ("guidance_methods_fashion_mnist", "fashion_mnist"),
        ("fashion_mnist", "fashion_mnist"),
    ],
)
def test_the_committed_study_numbers_come_from_their_cell_records(tmp_path, folder, data_name):
    """docs/results/*: metrics.json and tradeoff.csv are what the report stage makes of the committed cell
    records (regenerate them, as the digits README says, when the report's numbers change)."""
    import json

    from cfg.study.records import read_cells
    from cfg.study.report import write_report

    docs = ROOT / "docs" / "results" / folder
    committed = json.loads((docs / "metrics.json").read_text())
    out = {
        k: tmp_path / v
        for k, v in {"table": "t.csv", "metrics": "m.json", "plots": "plots", "report": "r.md"}.items()
    }
    write_report(
        [cell for path in sorted(docs.glob("cells_p_uncond=*.json")) for cell in read_cells(path)],
        grid_images={},
        classifier_accuracy=committed["classifier_test_accuracy"],
        data_name=data_name,
        experiment="cfg-lab",
        **out,
    )
    assert json.loads(out["metrics"].read_text()) == committed
    assert out["table"].read_text() == (docs / "tradeoff.csv").read_text()
