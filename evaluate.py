"""Score a saved CorInfoMax run on its test (or training) split.

    python evaluate.py RUN_DIR                 # test split: top-1, top-5, sparsity, n
    python evaluate.py RUN_DIR --split train --json

Loads RUN_DIR/last.pt (weights and the resolved configuration written by train.py),
rebuilds the same split with the same normalisation and subset, and runs the free phase
(beta = 0, T_free iterations from rest) on every sample once; the prediction is the argmax
of the output rates. A run trained on CUDA evaluates on a CPU-only machine.
"""

import json
import sys

import corinfomax as cim
import train


def main(argv=None):
    p = train.Parser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="run folder written by train.py (holds last.pt)")
    p.add_argument("--split", choices=("test", "train"), default="test",
                   help="which split to score (default test)")
    p.add_argument("--data-dir", help="data location if it moved (default: the run's own)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=train.positive_int, default=1000,
                   help="evaluation batch; results do not depend on it (default 1000)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)
    try:
        result = score(args)
    except train.UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was scored", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result))
    else:
        sparsity = " ".join(f"{s:.3f}" for s in result["sparsity"])
        print(f"{args.split}: top-1 {100 * result['top1']:.2f}%  top-5 "
              f"{100 * result['top5']:.2f}%  sparsity {sparsity}  n {result['n']}")
    return 0


def score(args):
    device = train.pick_device(args.device)
    run_dir = train.run_folder(args.run_dir)
    ckpt = train.load_checkpoint(run_dir)
    config = ckpt["config"]

    # The split, normalised as in training; its classes and image size must be the run's.
    on_train = args.split == "train"
    data_dir = args.data_dir or config["data_dir"]
    subset = config["train_subset" if on_train else "test_subset"]
    X, labels, classes, _ = train.load_data(config["dataset"], data_dir, on_train, subset,
                                            config["norm"])
    train.check_same_data(f"the {args.split} split in {data_dir}", classes, X.shape[1:],
                          config["classes"], config["model"]["sizes"][:1])

    model = cim.CorInfoMax(cim.Config(**config["model"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise train.UserError(f"{run_dir}/last.pt holds weights that do not fit its own "
                              "configuration: the file was altered") from None
    train.refuse_non_finite(model, run_dir)
    model.to(device)
    return cim.evaluate(model, X.to(device), labels.to(device), args.batch_size)


if __name__ == "__main__":
    sys.exit(main())
