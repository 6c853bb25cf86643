"""Train a CorInfoMax network on an image classification data set.

    python train.py                                   # CIFAR-100, seed-notebook recipe, 30 epochs
    python train.py --dataset cifar10 --epochs 10     # the paper's sparse CIFAR-10 recipe
    python train.py --dataset imagefolder --data-dir DIR --preset cifar10

The whole data set is loaded once as one tensor on the device (images flattened to rows,
normalised as in the paper), shuffled each epoch with a seeded generator, and fed to
`CorInfoMax.train_step` in batches as columns (N_0, m). After every epoch both splits are
scored with the free phase; the run folder receives config.json, metrics.json, last.pt
(written atomically) and curves.png.

Every recipe value comes from a named preset (PRESETS below, from the paper's tables and
the seed notebook) and can be overridden by its flag.
"""

import argparse
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

import corinfomax as cim

CHECKPOINT_VERSION = 1
DIAGNOSTIC_SAMPLES = 1000  # test samples for the angle and correlative-information estimates

# Recipes: layers and rates from the paper's appendix tables; "cifar100" is the seed
# notebook's sparse recipe. lr_ff runs over W_ff[0..P-1], lr_fb over W_fb[1..P-1], q_lr
# over layers 1..P. lr_decay d and lr_decay_until E1: mu(e) = mu_0 d^e for e < E1, else
# mu_0 0.9^e. All recipes: eps 0.15, |beta| 1 with random sign, eta_stop 0.001, batch 20.
PRESETS = {
    "cifar100": dict(  # seed notebook: 13.6 % top-1 after 30 epochs (one run)
        hidden=[2000, 1000], layer_type="sparse", lam=0.99999, lr_ff=[0.16, 0.13, 0.08],
        lr_fb=[0.06, 0.04], q_lr=[5e-6, 5e-6, 0.01], neural_lr=0.03,
        neural_lr_rule="constant", t_free=20, t_nudged=5, g=0.1, lr_decay=0.95,
        lr_decay_until=15),
    "cifar100-bounded": dict(  # paper: 20.84 +- 0.43 % top-1 after 50 epochs
        hidden=[2000, 1000], layer_type="bounded", lam=0.99999, lr_ff=[0.18, 0.15, 0.09],
        lr_fb=[0.08, 0.06], q_lr=[0.0, 0.0, 0.0], neural_lr=0.06,
        neural_lr_rule="constant", t_free=50, t_nudged=20, g=0.1, lr_decay=0.99,
        lr_decay_until=20),
    "cifar10": dict(  # paper, sparse: 51.19 +- 0.36 % after 50 epochs
        hidden=[1000], layer_type="sparse", lam=0.99999, lr_ff=[0.095, 0.075], lr_fb=[0.05],
        q_lr=[1e-5, 0.01], neural_lr=0.025, neural_lr_rule="divide_by_slow_loop_index",
        t_free=30, t_nudged=10, g=0.1, lr_decay=0.95, lr_decay_until=15),
    "cifar10-bounded": dict(  # paper, bounded: 51.86 +- 0.33 % after 50 epochs
        hidden=[1000], layer_type="bounded", lam=0.99995, lr_ff=[0.08, 0.04], lr_fb=[0.04],
        q_lr=[0.0, 0.0], neural_lr=0.05, neural_lr_rule="constant", t_free=30, t_nudged=10,
        g=0.1, lr_decay=0.95, lr_decay_until=15),
    "mnist": dict(  # paper, sparse: 97.71 %
        hidden=[500], layer_type="sparse", lam=0.99999, lr_ff=[1.0, 0.7], lr_fb=[0.12],
        q_lr=[1e-6, 0.01], neural_lr=0.05, neural_lr_rule="constant", t_free=20,
        t_nudged=4, g=0.5, lr_decay=0.95, lr_decay_until=15),
    "mnist-bounded": dict(  # paper, bounded: 97.62 %
        hidden=[500], layer_type="bounded", lam=0.99999, lr_ff=[1.0, 0.7], lr_fb=[0.15],
        q_lr=[0.0, 0.0], neural_lr=0.05, neural_lr_rule="constant", t_free=30,
        t_nudged=10, g=0.5, lr_decay=0.95, lr_decay_until=15),
    "fashion-mnist": dict(  # paper, sparse: 88.09 %
        hidden=[500], layer_type="sparse", lam=0.99999, lr_ff=[0.35, 0.23], lr_fb=[0.06],
        q_lr=[1e-6, 0.01], neural_lr=0.045, neural_lr_rule="divide_by_slow_loop_index",
        t_free=20, t_nudged=10, g=0.2, lr_decay=0.95, lr_decay_until=11),
    "fashion-mnist-bounded": dict(  # paper, bounded: 88.14 % (see README: schedule)
        hidden=[500], layer_type="bounded", lam=0.99999, lr_ff=[0.3, 0.22], lr_fb=[0.07],
        q_lr=[0.0, 0.0], neural_lr=0.07, neural_lr_rule="divide_by_slow_loop_index",
        t_free=30, t_nudged=10, g=0.3, lr_decay=0.95, lr_decay_until=20),
}
COMMON = dict(eps=0.15, beta=1.0, neural_lr_stop=0.001, batch_size=20, third_phase=False,
              exact_lateral=False)
DEFAULT_PRESET = {"cifar100": "cifar100", "cifar10": "cifar10", "imagefolder": "cifar10",
                  "mnist": "mnist", "fashion-mnist": "fashion-mnist"}

# CIFAR normalisation of the paper: ToTensor, then mean and three times the std per channel.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD3 = (3 * 0.2023, 3 * 0.1994, 3 * 0.2010)
DOWNLOADS = {
    "cifar100": "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/ "
                "(or its extracted folder cifar-100-python/)",
    "cifar10": "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/ "
               "(or its extracted folder cifar-10-batches-py/)",
    "mnist": "the four MNIST .gz files (train-images-idx3-ubyte.gz, ...) into MNIST/raw/",
    "fashion-mnist": "the four Fashion-MNIST .gz files into FashionMNIST/raw/",
}


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem, then where to look for the fix."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def number(kind, allow_zero=False, most=None):
    """An argparse type: a finite `kind` above zero (or at least zero with allow_zero), and
    at most `most` if given."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(
                f"{text!r} must be a finite number {'>= 0' if allow_zero else 'above 0'}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"{text!r} is too large (at most {most:.0e})")
        return value
    return parse


# Counts (sizes, batches, steps) stop at 10^12, far beyond any memory, so that a typing slip
# gets this one line instead of an integer overflow inside torch.
positive_int = number(int, most=10**12)
positive, non_negative = number(float), number(float, True)


def seed_value(text):
    """An argparse type: a seed torch accepts, 0 <= seed < 2^63."""
    value = number(int, allow_zero=True)(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} must be below 2^63")
    return value


def listed(item):
    """An argparse type: comma-separated values, each parsed by `item`."""
    def parse(text):
        return [item(v) for v in text.split(",")]
    parse.__name__ = "comma-separated list"
    return parse


def build_parser():
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=sorted(DEFAULT_PRESET),
                   help="data set (default cifar100, the seed notebook's)")
    p.add_argument("--data-dir",
                   help="where torchvision keeps the data; for imagefolder the folder with "
                        "train/ and test/ (or val/) class folders (default ./data)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="named recipe (default: follows --dataset: cifar100 -> cifar100, "
                        "cifar10 and imagefolder -> cifar10, mnist -> mnist, ...)")
    p.add_argument("--epochs", type=positive_int,
                   help="epochs to reach in all (default 30, as the seed notebook; with "
                        "--resume, the run's own)")
    p.add_argument("--batch-size", type=positive_int,
                   help="training batch (default 20, the paper's)")
    p.add_argument("--eval-batch-size", type=positive_int,
                   help="evaluation batch; results do not depend on it (default 1000 on CPU, "
                        "10000 on CUDA)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, replay each training step from a captured graph (default on)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or cuda:N (default auto: cuda when available)")
    p.add_argument("--seed", type=seed_value, default=0,
                   help="seed of the weights, the shuffle and the signs of beta (default 0)")
    p.add_argument("--out", help="run folder (default runs/<dataset>-<date>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR after its last completed epoch")
    p.add_argument("--train-subset", type=positive_int, metavar="N",
                   help="train on a fixed sample of N (the same in every run; quick checks)")
    p.add_argument("--test-subset", type=positive_int, metavar="N",
                   help="test on a fixed sample of N (the same in every run; quick checks)")
    g = p.add_argument_group("recipe overrides (each default comes from --preset)")
    g.add_argument("--hidden", type=listed(positive_int), help="hidden sizes, e.g. 2000,1000")
    g.add_argument("--layer-type",
                   help="sparse (relu + l1 interneuron) or bounded (clip to [0, 1]); one for "
                        "all layers or one per layer above the input, e.g. sparse,bounded")
    g.add_argument("--lam", type=positive, help="forgetting factor lambda, in (0, 1)")
    g.add_argument("--eps", type=positive,
                   help="epsilon: log-det regulariser and error scale (0.15 in every recipe)")
    g.add_argument("--g", type=non_negative, help="leak conductance g")
    g.add_argument("--beta", type=positive, help="nudge strength |beta| (1 in every recipe)")
    g.add_argument("--neural-lr", type=positive, help="Euler step eta_0 of the dynamics")
    g.add_argument("--neural-lr-stop", type=non_negative, help="floor of eta_s (0.001)")
    g.add_argument("--neural-lr-rule", choices=cim.NEURAL_LR_RULES,
                   help="eta_s at iteration s: eta_0; max(eta_0 / (s + 1), stop); or "
                        "max(eta_0 / (0.01 s + 1), stop)")
    g.add_argument("--t-free", type=positive_int, help="free-phase iterations")
    g.add_argument("--t-nudged", type=positive_int, help="nudged-phase iterations")
    g.add_argument("--lr-ff", type=listed(positive),
                   help="mu_ff, one per layer above the input (W_ff[0] first)")
    g.add_argument("--lr-fb", type=listed(positive),
                   help="mu_fb, one per hidden layer (W_fb[1] first)")
    g.add_argument("--q-lr", type=listed(non_negative),
                   help="interneuron step eta_q, one per layer above the input")
    g.add_argument("--lr-decay", type=positive, help="per-epoch decay d of the learning rates")
    g.add_argument("--lr-decay-until", type=positive_int,
                   help="epoch E1 from which the rates decay as 0.9^e")
    g.add_argument("--third-phase", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric nudging with a third phase at -beta (off in the recipes)")
    g.add_argument("--exact-lateral", action=argparse.BooleanOptionalAction, default=None,
                   help="exact rank-m inverse for B instead of the first-order update")
    return p


RECIPE_FLAGS = ["hidden", "layer_type", "lam", "eps", "g", "beta", "neural_lr",
                "neural_lr_stop", "neural_lr_rule", "t_free", "t_nudged", "lr_ff", "lr_fb",
                "q_lr", "lr_decay", "lr_decay_until", "third_phase", "exact_lateral",
                "batch_size"]
RUN_FLAGS = ["dataset", "preset", "seed", "train_subset", "test_subset"]


def flag(key):
    return "--" + key.replace("_", "-")


def resolve_recipe(args):
    """The preset named by --preset (or the data set's default) with flags applied."""
    name = args.preset or DEFAULT_PRESET[args.dataset]
    recipe = dict(COMMON, **PRESETS[name], preset=name)
    for key in RECIPE_FLAGS:
        value = getattr(args, key)
        if value is not None:
            recipe[key] = value
    check_recipe(recipe)
    return recipe


def check_recipe(recipe):
    """Per-layer lists must match the layers; one UserError names the flag to fix."""
    P = len(recipe["hidden"]) + 1
    types = recipe["layer_type"].split(",")
    expected = {"lr_ff": (P, "W_ff[0] first"), "lr_fb": (P - 1, "W_fb[1] first"),
                "q_lr": (P, "layer 1 first"), "layer_type": (P, "layer 1 first")}
    for key, (n, order) in expected.items():
        got = len(types) if key == "layer_type" else len(recipe[key])
        if got != n and not (key == "layer_type" and got == 1):
            raise UserError(f"{flag(key)} has {got} values but the hidden sizes "
                            f"{recipe['hidden']} make {P} layers above the input, so it needs "
                            f"{n} ({order}); pass {flag(key)} with {n} comma-separated values")
    bad = [t for t in types if t not in cim.LAYER_TYPES]
    if bad:
        raise UserError(f"--layer-type {bad[0]!r} is unknown: use sparse or bounded")
    if not 0 < recipe["lam"] < 1:
        raise UserError(f"--lam {recipe['lam']} must lie strictly between 0 and 1 "
                        "(the recipes use 0.99999)")
    if recipe["neural_lr_stop"] > recipe["neural_lr"]:
        raise UserError(f"--neural-lr-stop {recipe['neural_lr_stop']} is above --neural-lr "
                        f"{recipe['neural_lr']}: the floor of the step must lie below its start")
    for k, t in enumerate(types * P if len(types) == 1 else types):
        if t == "sparse" and recipe["q_lr"][k] <= 0:
            raise UserError(f"--q-lr: layer {k + 1} is sparse and needs a positive "
                            "interneuron step (the recipes use 1e-6 to 0.01)")


def model_config(recipe, n_in, n_classes):
    """The corinfomax.Config of a recipe for data with n_in inputs and n_classes classes."""
    sizes = [n_in] + list(recipe["hidden"]) + [n_classes]
    P = len(sizes) - 1
    types = recipe["layer_type"].split(",")
    if len(types) == 1:
        types = types * P
    return cim.Config(
        sizes=sizes, layer_types=types, lr_ff=list(recipe["lr_ff"]),
        lr_fb=list(recipe["lr_fb"]), q_lr=list(recipe["q_lr"]), lam=recipe["lam"],
        eps=recipe["eps"], g=recipe["g"], beta=recipe["beta"], neural_lr=recipe["neural_lr"],
        neural_lr_stop=recipe["neural_lr_stop"], neural_lr_rule=recipe["neural_lr_rule"],
        t_free=recipe["t_free"], t_nudged=recipe["t_nudged"],
        third_phase=recipe["third_phase"], exact_lateral=recipe["exact_lateral"])


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        with warnings.catch_warnings():  # some device names warn before they fail
            warnings.simplefilter("ignore")
            device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported --device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but this PyTorch sees no CUDA GPU: "
                        "use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA devices")
    return device if device.type == "cuda" else torch.device("cpu")  # cpu:N is the one CPU


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------

def torchvision_split(dataset, data_dir, train):
    """Images (n, C, H, W) uint8 and labels (n,) of a torchvision data set, downloading it
    when missing; a failed download becomes one UserError naming the files to place."""
    import torchvision.datasets as tvd

    cls = {"cifar100": tvd.CIFAR100, "cifar10": tvd.CIFAR10, "mnist": tvd.MNIST,
           "fashion-mnist": tvd.FashionMNIST}[dataset]
    try:
        ds = cls(data_dir, train=train, download=False)
    except RuntimeError:
        try:
            ds = cls(data_dir, train=train, download=True)
        except Exception as exc:
            raise UserError(
                f"could not find or download {dataset} in {data_dir} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no details'}): with no network, "
                f"place {DOWNLOADS[dataset]} in {data_dir}/ (remove any damaged copy there) "
                "and rerun") from None
    data = torch.as_tensor(np.asarray(ds.data))
    images = data.permute(0, 3, 1, 2) if data.ndim == 4 else data[:, None]  # (n, C, H, W)
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
    return images.contiguous(), labels, list(ds.classes)


def subset_indices(n, subset):
    """Indices of the --train-subset / --test-subset sample: the first `subset` of one fixed
    permutation (the same in every run), since ImageFolder lists are sorted by class."""
    if subset is None or subset >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:subset]


def imagefolder_split(data_dir, train, subset=None):
    """Images (n, C, H, W) uint8, labels and class names from DIR/train or DIR/test|val."""
    from PIL import Image
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    root = Path(data_dir)
    sub = root / "train" if train else next(
        (root / s for s in ("test", "val") if (root / s).is_dir()), root / "test")
    if not sub.is_dir():
        raise UserError(f"imagefolder: {sub} is not a folder; --data-dir needs train/ and "
                        "test/ (or val/) folders with one subfolder per class")
    try:
        ds = ImageFolder(str(sub), loader=Image.open, allow_empty=True)
    except (FileNotFoundError, OSError) as exc:
        raise UserError(f"imagefolder: {str(exc).splitlines()[0]}") from None
    if len(ds.classes) < 2:
        raise UserError(f"imagefolder: {sub} has {len(ds.classes)} class folder(s); a "
                        "classifier needs at least two, one subfolder of images per class")
    counts = torch.bincount(torch.tensor(ds.targets, dtype=torch.long),
                            minlength=len(ds.classes))
    if (counts == 0).any():
        empty = ds.classes[int((counts == 0).nonzero()[0])]
        raise UserError(f"imagefolder: the class folder {sub / empty} holds no images; "
                        "add images or remove the folder")
    samples = [ds.samples[i] for i in subset_indices(len(ds.samples), subset)]
    images, first = [], None
    for path, _ in samples:
        try:
            img = Image.open(path)
            img.load()
        except OSError as exc:
            raise UserError(f"imagefolder: cannot read {path} as an image ({type(exc).__name__}: "
                            f"{exc}): remove or replace the file") from None
        with img:
            key = (img.mode, img.size)
            if first is None:
                first = (key, path)
            elif key != first[0]:
                raise UserError(
                    f"imagefolder: {path} is {key[0]} {key[1][0]}x{key[1][1]} but {first[1]} "
                    f"is {first[0][0]} {first[0][1][0]}x{first[0][1][1]}: all images must "
                    "share one size and colour mode; convert them first")
            images.append(pil_to_tensor(img))
    labels = torch.tensor([label for _, label in samples], dtype=torch.long)
    return torch.stack(images), labels, list(ds.classes)


def load_data(dataset, data_dir, train, subset=None, norm=None):
    """One split as float rows (n, N_0) and labels (n,), normalised as in the paper.

    norm: (mean, std) per channel; None takes the data set's own: CIFAR constants, [0, 1]
    for MNIST-like data, and for imagefolder the split's own channel means and 3x stds.
    Returns X, labels, the class names and norm.
    """
    if dataset == "imagefolder":
        images, labels, classes = imagefolder_split(data_dir, train, subset)
    else:
        images, labels, classes = torchvision_split(dataset, data_dir, train)
        keep = subset_indices(len(labels), subset)
        images, labels = images[keep], labels[keep]
    x = images.float() / 255.0  # ToTensor, (n, C, H, W)
    if norm is None:
        if dataset in ("cifar10", "cifar100"):
            norm = (list(CIFAR_MEAN), list(CIFAR_STD3))
        elif dataset == "imagefolder":
            norm = (x.mean((0, 2, 3)).tolist(), (3 * x.std((0, 2, 3))).tolist())
            flat = [c for c, s in enumerate(norm[1]) if s == 0]
            if flat:
                raise UserError(f"imagefolder: colour channel {flat[0]} has the same value in "
                                f"every training image of {data_dir} (an opaque alpha "
                                "channel?): convert the images to RGB or grayscale")
        else:
            norm = ([0.0] * x.shape[1], [1.0] * x.shape[1])
    if len(norm[0]) != x.shape[1]:
        raise UserError(f"the {'training' if train else 'test'} images in {data_dir} have "
                        f"{x.shape[1]} colour channel(s) where {len(norm[0])} are expected: all "
                        "images of a run must share one colour mode")
    mean = torch.tensor(norm[0])[None, :, None, None]
    std = torch.tensor(norm[1])[None, :, None, None]
    X = ((x - mean) / std).reshape(x.shape[0], -1)
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(classes)):
        raise UserError(f"labels outside 0..{len(classes) - 1} in the {dataset} data: "
                        "check the data files")
    return X, labels, classes, norm


def check_same_data(what, classes, shape, expected_classes, expected_shape):
    """Refuse data whose classes (by name, in order) or image size differ from a reference."""
    if list(classes) != list(expected_classes):
        missing = sorted(set(expected_classes) - set(classes))[:3]
        extra = sorted(set(classes) - set(expected_classes))[:3]
        raise UserError(f"{what} holds other classes than the training data (missing "
                        f"{missing or 'none'}, unexpected {extra or 'none'}): labels are "
                        "matched by class name, so every split must hold the same classes")
    if list(shape) != list(expected_shape):
        raise UserError(f"{what} has images of {shape[0]} inputs per image where "
                        f"{expected_shape[0]} are expected: every image must have the same "
                        "size and colour mode")


# ----------------------------------------------------------------------------------------
# Run folder: checkpoint, metrics, plot
# ----------------------------------------------------------------------------------------

def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: an interrupted save leaves the old file."""
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(obj, path):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def rng_states(gen):
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "generator": gen.get_state(),
            "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      *np_state[2:]]}


def set_rng_states(states, gen):
    torch.set_rng_state(states["torch"])
    gen.set_state(states["generator"])
    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = states["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), *npst[2:]))


def plot_curves(metrics, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [m["epoch"] for m in metrics]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [100 * m["train_top1"] for m in metrics], "o-", label="train top-1")
    ax.plot(epochs, [100 * m["test_top1"] for m in metrics], "o-", label="test top-1")
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


CHECKPOINT_KEYS = ("format_version", "model", "config", "epoch", "metrics", "rng")


def run_folder(path):
    """The run folder named by `path`: the folder itself, or the folder of its last.pt."""
    path = Path(path)
    return path.parent if path.name == "last.pt" and path.is_file() else path


def load_checkpoint(run_dir):
    path = Path(run_dir) / "last.pt"
    if not path.is_file():
        raise UserError(f"no checkpoint {path}: pass the folder of a run that finished at "
                        "least one epoch")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path} cannot be read ({type(exc).__name__}): it is damaged or not "
                        "a checkpoint of this project") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a checkpoint of this project")
    if ckpt.get("format_version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} has checkpoint format {ckpt.get('format_version')}, this "
                        f"code reads format {CHECKPOINT_VERSION}")
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: it was altered or not written by "
                        "train.py; resume or evaluate the run's own last.pt")
    return ckpt


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------

def check_resume_flags(args, config):
    """A resumed run keeps its own configuration: refuse flags that would change it."""
    parser = build_parser()
    for key in RECIPE_FLAGS + RUN_FLAGS:
        value = getattr(args, key)
        default = parser.get_default(key)
        if value is not None and value != default and value != config.get(key):
            raise UserError(f"{flag(key)} {value} differs from the run's {config.get(key)}: "
                            "--resume continues a run with its own settings (only --epochs, "
                            "--device, --eval-batch-size and --data-dir may change); start a "
                            "new run with --out to change them")


class Diverged(Exception):
    """Rates or weights became non-finite."""


def weights_finite(model):
    return all(bool(torch.isfinite(b).all()) for b in model.buffers())


def refuse_non_finite(model, run_dir):
    """Stop with one line where the weights loaded from run_dir/last.pt are not finite."""
    if not weights_finite(model):
        raise UserError(f"{run_dir}/last.pt holds non-finite weights: start a new run with a "
                        "smaller --neural-lr or smaller learning rates")


def train_epoch(step, model, X, labels, batch_size, scale, gen, bar):
    """One pass over the shuffled training rows. Checks the output rates for divergence
    every 100 steps and the weights every 500 (a full scan each step would cost more)."""
    n = X.shape[0]
    order = torch.randperm(n, generator=gen).to(X.device)
    for i, start in enumerate(range(0, n, batch_size)):
        idx = order[start:start + batch_size]
        free = step(X[idx].T, labels[idx], scale, generator=gen)
        if i % 100 == 0 and not math.isfinite(free[-1].sum().item()):
            raise Diverged(f"non-finite rates at step {i + 1}")
        if i % 500 == 0 and not weights_finite(model):
            raise Diverged(f"non-finite weights at step {i + 1}")
        bar.update(1)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, KeyboardInterrupt, Diverged) as exc:
        message, status = failure_message(exc, args)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return status


def failure_message(exc, args):
    """One line and an exit status for a run that stopped part-way; (None, None) for errors
    that are not understood here (they keep their traceback)."""
    out = getattr(args, "run_dir", None)
    saved = out is not None and (out / "last.pt").exists()
    if saved:
        kept = f"the checkpoint of the last finished epoch is kept: --resume {out} continues"
    else:
        kept = "no epoch had finished, so there is no checkpoint to keep"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, KeyboardInterrupt):
        return f"interrupted: {kept}", 130
    if isinstance(exc, Diverged):
        where = f"{out}/last.pt, the last good epoch, is kept untouched" if saved else \
            "no epoch had finished, so there is no checkpoint to keep"
        return (f"error: training diverged ({text}): the neural step --neural-lr or the "
                f"learning rates --lr-ff/--lr-fb are likely too large (or another recipe "
                f"value is far outside the recipes' range); start a new run with smaller "
                f"values; {where}"), 3
    if isinstance(exc, OSError):
        return f"error: could not write the run folder ({text}): {kept}", 1
    if "allocate" in text or "out of memory" in text:
        return (f"error: not enough memory ({text}): use smaller --hidden, --batch-size or "
                f"--eval-batch-size; {kept}"), 1
    if "overflow" in text:
        return (f"error: a value overflowed ({text}): a recipe value (--g, --beta, --lam, "
                f"--lr-ff, ...) is far outside the recipes' range; {kept}"), 1
    return None, None


def check_out_folder(out):
    """Refuse an --out that is a file or lies under one, before any work is done."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"--out {out}: cannot create a folder under {parent}; pass a writable "
                        "folder")


def run(args):
    from tqdm import tqdm

    device = pick_device(args.device)
    for key in ("resume", "out", "data_dir"):
        if getattr(args, key) is not None and not getattr(args, key).strip():
            raise UserError(f"{flag(key)} is empty (an unset shell variable?): pass a folder")

    # Configuration: a new run resolves its recipe; a resumed run reads its own.
    if args.resume:
        out = run_folder(args.resume)
        ckpt = load_checkpoint(out)
        config = ckpt["config"]
        check_resume_flags(args, config)
        if args.out and Path(args.out) != out:
            raise UserError(f"--out {args.out} with --resume {out}: a resumed run stays in its "
                            "own folder; drop --out")
        config["epochs"] = args.epochs or config["epochs"]
        config["data_dir"] = str(Path(args.data_dir).resolve()) if args.data_dir \
            else config["data_dir"]
        if ckpt["epoch"] >= config["epochs"]:
            print(f"{out} has already finished {ckpt['epoch']} of {config['epochs']} epochs; "
                  "pass --epochs N with a larger N to train on")
            return 0
    else:
        args.dataset = args.dataset or "cifar100"
        args.data_dir = str(Path(args.data_dir or "./data").resolve())
        recipe = resolve_recipe(args)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path(args.out or f"runs/{args.dataset}-{stamp}")
        check_out_folder(out)
        if (out / "last.pt").exists():
            raise UserError(f"{out} already holds a run: pass --resume {out} to continue it, "
                            "or another --out")
        config = dict(recipe, dataset=args.dataset, data_dir=args.data_dir, seed=args.seed,
                      epochs=args.epochs or 30, train_subset=args.train_subset,
                      test_subset=args.test_subset)

    args.run_dir = out

    # Data: both splits as one tensor each on the device.
    Xtr, Ytr, classes, norm = load_data(config["dataset"], config["data_dir"], True,
                                        config["train_subset"], config.get("norm"))
    Xte, Yte, test_classes, _ = load_data(config["dataset"], config["data_dir"], False,
                                          config["test_subset"], norm)
    if args.resume:
        check_same_data(f"--data-dir {config['data_dir']}", classes, Xtr.shape[1:],
                        config["classes"], config["model"]["sizes"][:1])
    check_same_data("the test split", test_classes, Xte.shape[1:], classes, Xtr.shape[1:])
    for split, X in (("train", Xtr), ("test", Xte)):
        asked = config[f"{split}_subset"]
        if asked is not None and asked > X.shape[0]:
            print(f"note: --{split}-subset {asked} is more than the {X.shape[0]} samples of the "
                  f"{split} split; all of them are used")
    n_classes = len(classes)
    config["norm"], config["classes"] = norm, classes
    if config["batch_size"] > Xtr.shape[0]:
        raise UserError(f"--batch-size {config['batch_size']} is larger than the "
                        f"{Xtr.shape[0]} training samples: use a smaller batch or more data")
    Xtr, Ytr, Xte, Yte = (t.to(device) for t in (Xtr, Ytr, Xte, Yte))

    # Model, generator and history, fresh or from the checkpoint.
    try:
        cfg = model_config(config, Xtr.shape[1], n_classes)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    config["model"] = cfg.to_dict()
    torch.manual_seed(config["seed"])
    gen = torch.Generator().manual_seed(config["seed"])
    model = cim.CorInfoMax(cfg, seed=config["seed"])
    metrics, start = [], 0
    if args.resume:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError:
            raise UserError(f"{out}/last.pt does not fit the network {cfg.sizes} built from "
                            f"the data in {config['data_dir']}: the data set or its classes "
                            "changed since the run started, or the file was altered; point "
                            "--data-dir at the run's data or start a new run") from None
        refuse_non_finite(model, out)
        set_rng_states(ckpt["rng"], gen)
        metrics, start = ckpt["metrics"], ckpt["epoch"]
    model.to(device)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config, out / "config.json")

    bs = config["batch_size"]
    steps = math.ceil(Xtr.shape[0] / bs)
    step = cim.GraphedStep(model, bs, capture=device.type == "cuda" and args.cuda_graphs)
    eval_bs = args.eval_batch_size or (10000 if device.type == "cuda" else 1000)
    print(f"{config['dataset']}: {Xtr.shape[0]} train, {Xte.shape[0]} test, layers "
          f"{cfg.sizes} ({','.join(cfg.layer_types)}), preset {config['preset']}, {device}, "
          f"run folder {out}")
    if start:
        print(f"resuming after epoch {start} of {config['epochs']}")
    for epoch in range(start, config["epochs"]):
        t0 = time.time()
        scale = cim.lr_scale(epoch, config["lr_decay"], config["lr_decay_until"])
        with tqdm(total=steps, desc=f"epoch {epoch + 1}", unit="step", leave=False,
                  dynamic_ncols=True, disable=None) as bar:  # no bar when not a terminal
            train_epoch(step, model, Xtr, Ytr, bs, scale, gen, bar)
        if not weights_finite(model):
            raise Diverged(f"non-finite weights after epoch {epoch + 1}")
        tr = cim.evaluate(model, Xtr, Ytr, eval_bs)
        te = cim.evaluate(model, Xte, Yte, eval_bs)
        seconds = time.time() - t0
        diag = model.diagnostics(Xte[:DIAGNOSTIC_SAMPLES].T)
        metrics.append({"epoch": epoch + 1, "lr_scale": scale, "train_top1": tr["top1"],
                        "train_top5": tr["top5"], "test_top1": te["top1"],
                        "test_top5": te["top5"], "sparsity": te["sparsity"],
                        "seconds": seconds, "angle": diag["angle"], "corinfo": diag["corinfo"]})
        save_atomic({"format_version": CHECKPOINT_VERSION, "model": model.state_dict(),
                     "config": config, "epoch": epoch + 1, "metrics": metrics,
                     "rng": rng_states(gen)}, out / "last.pt")
        write_json_atomic(metrics, out / "metrics.json")
        plot_curves(metrics, out / "curves.png",
                    f"CorInfoMax {cfg.sizes}, {config['dataset']} ({config['preset']})")
        sparsity = " ".join(f"{s:.2f}" for s in te["sparsity"])
        print(f"epoch {epoch + 1}/{config['epochs']} | lr x{scale:.3f} | train top-1 "
              f"{100 * tr['top1']:.2f}% top-5 {100 * tr['top5']:.2f}% | test top-1 "
              f"{100 * te['top1']:.2f}% top-5 {100 * te['top5']:.2f}% | sparsity {sparsity} | "
              f"{seconds:.1f} s", flush=True)
    return 0


def stop_on_sigterm(signum, frame):
    """SIGTERM (a scheduler's kill, `kill PID`) stops a run the way Ctrl-C does."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    sys.exit(main())
