"""Time the CorInfoMax training step and evaluation at a recipe's layer sizes.

    python benchmark.py                           # CIFAR-100 seed recipe, batch 20, auto device
    python benchmark.py --preset cifar10 --device cpu --json

Random inputs and labels of the recipe's sizes (CIFAR: 3072 inputs; 100 or 10 classes; MNIST:
784 and 10), on the chosen device, after a warm-up. Training runs the path train.py uses
(`GraphedStep`: CUDA graphs on a GPU, `fast_step` on a CPU; `--plain` times the plain
`train_step` instead, `--no-onednn` the fast path without oneDNN's products); evaluation is
the free phase in batches of --eval-batch-size.
Prints ms per training step, training and evaluation samples per second, and peak memory.
"""

import json
import resource
import time

import torch

import corinfomax as cim
from train import COMMON, PRESETS, Parser, UserError, model_config, pick_device, positive_int


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats, device):
    """Seconds per call of fn, after one untimed call."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def main(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cifar100", choices=sorted(PRESETS),
                   help="recipe whose layer sizes and iterations are timed (default cifar100)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=positive_int, default=20,
                   help="training batch (default 20)")
    p.add_argument("--eval-batch-size", type=positive_int,
                   help="evaluation batch (default 1000 on CPU, 10000 on CUDA)")
    p.add_argument("--steps", type=positive_int, default=20,
                   help="timed training steps (default 20)")
    p.add_argument("--eval-samples", type=positive_int,
                   help="samples evaluated (default: 4 eval batches on CUDA, 2 on CPU)")
    p.add_argument("--plain", action="store_true", help="time the plain train_step instead")
    p.add_argument("--no-onednn", action="store_true",
                   help="fast path with plain products only (no oneDNN copies of the weights)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)
    if args.no_onednn:
        cim.USE_ONEDNN = False
    try:
        device = pick_device(args.device)
    except UserError as exc:
        p.exit(2, f"error: {exc}\n")
    try:
        measure(args, device)
    except KeyboardInterrupt:
        p.exit(130, "interrupted: nothing was measured to the end\n")
    except RuntimeError as exc:
        if "allocate" not in str(exc) and "out of memory" not in str(exc):
            raise
        p.exit(1, f"error: not enough memory ({str(exc).splitlines()[0]}): use a smaller "
                  "--batch-size, --eval-batch-size or --eval-samples\n")


def measure(args, device):
    """Build the recipe's network on `device`, time it and print the figures."""
    recipe = dict(COMMON, **PRESETS[args.preset])
    n_in, n_classes = (784, 10) if "mnist" in args.preset else (3072, 10)
    if args.preset.startswith("cifar100"):
        n_classes = 100
    torch.manual_seed(0)
    model = cim.CorInfoMax(model_config(recipe, n_in, n_classes)).to(device)
    gen = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # Training: the same batch again and again (the cost does not depend on the values).
    m = args.batch_size
    x = torch.rand(n_in, m, device=device)
    labels = torch.randint(n_classes, (m,), device=device)
    if args.plain:
        def step():
            model.train_step(x, labels, 1.0, gen)
    else:
        graphed = cim.GraphedStep(model, m)

        def step():
            graphed(x, labels, 1.0, gen)
    timed(step, 2, device)  # warm-up: both signs of beta are captured on CUDA
    train_s = timed(step, args.steps, device)

    # Evaluation: free phase on large batches.
    eval_bs = args.eval_batch_size or (10000 if device.type == "cuda" else 1000)
    n_eval = args.eval_samples or eval_bs * (4 if device.type == "cuda" else 2)
    eval_bs = min(eval_bs, n_eval)  # the batch as run
    X = torch.rand(n_eval, n_in, device=device)
    Y = torch.randint(n_classes, (n_eval,), device=device)
    eval_s = timed(lambda: cim.evaluate(model, X, Y, eval_bs), 1, device)

    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        memory = "GPU memory allocated"
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        memory = "process resident memory"
    onednn = not args.plain and any(P.packed is not None
                                    for group in model.prepare(m) for P in group[1:])
    result = {"preset": args.preset, "device": str(device), "plain": args.plain,
              "onednn": onednn,
              "batch_size": m, "layers": model.cfg.sizes,
              "train_ms_per_step": 1000 * train_s, "train_samples_per_s": m / train_s,
              "eval_batch_size": eval_bs, "eval_samples_per_s": n_eval / eval_s,
              "peak_memory_mb": peak_mb, "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(result))
    else:
        path = ("plain path" if args.plain else
                "fast path, " + ("oneDNN products" if onednn else "plain products"))
        print(f"{args.preset} {model.cfg.sizes} on {device} ({torch.get_num_threads()} threads),"
              f" {path}\n"
              f"train: {1000 * train_s:.1f} ms per step of {m}, {m / train_s:.0f} samples/s\n"
              f"eval:  {n_eval / eval_s:.0f} samples/s (batch {eval_bs})\n"
              f"peak {memory}: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
