"""Stage-output plumbing (cfg.study.stage): whole files, the usual file mode."""

import os
import subprocess
import sys


def test_stage_outputs_are_written_whole_with_the_usual_file_mode(tmp_path):
    # a fresh interpreter under umask 022, which cfg.io reads at import: files come out 0644, not 0600
    out = tmp_path / "results" / "metrics.json"
    code = (
        "import sys; from cfg.io import write_json; "
        "write_json(sys.argv[1], {'fid': 1.5}); write_json(sys.argv[1], {'fid': 2.5})"
    )
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, preexec_fn=lambda: os.umask(0o022))
    assert out.read_text() == '{\n  "fid": 2.5\n}\n'
    assert (out.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"], "no temporary file left behind"
