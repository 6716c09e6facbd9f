"""Stage `inputs` (always run): hash the files outside the repository that the study reads, the data set's and the
Inception weights, into the JSON files that `prepare` and `reference` depend on (cfg.data.sources says why)."""

import argparse

from cfg.data.sources import data_record, weights_record
from cfg.io import write_json
from cfg.study.stage import data_root, stage_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True, help="JSON record of the data set's files (a dep of prepare)")
    ap.add_argument(
        "--weights", required=True, help="JSON record of the Inception weights (a dep of reference)"
    )
    args = ap.parse_args()
    params = stage_params()  # the first stage: a bad params.yaml stops here, before any other
    d = params.data
    data = data_record(d.name, data_root(d.root))
    write_json(args.data, data)
    write_json(args.weights, weights_record(data_root(params.evaluate.inception_weights)))
    where = f" under {d.root}" if d.root else ""
    print(f"[inputs] {d.name}: {len(data['files'])} file(s){where} hashed")


if __name__ == "__main__":
    main()
