"""The settings of ``fastconv train-mnist``: recipes, defaults, the augmentation spec, and the
checks of a run's settings, alone and against the run a ``--resume`` continues."""

from __future__ import annotations

__all__ = ["RECIPES", "RUN_DEFAULTS", "parse_augment"]

# Settings a resumed run must share with the run it continues (None: not given on the command
# line, take the saved or the default value).
RUN_DEFAULTS = {
    "batch_size": 100,
    "lr": 1e-3,
    "optimizer": "adam",
    "dtype": "float32",
    "seed": None,
    "val_size": 5000,
    "limit_train": None,
}

# The recipes: defaults of the training settings (--flags given on the command line win). "book"
# is the book's ch. 8 recipe; "augmented" adds the CNN courses' techniques (docs/training.md
# has the runs that chose it, on the validation set only).
RECIPES = {
    "book": {
        "epochs": 20,
        "net": "book",
        "schedule": "constant",
        "warmup": 0,
        "min_lr": 0.0,
        "lr_gamma": None,
        "lr_step": None,
        "augment": "none",
        "weight_decay": 0.0,
        "label_smoothing": 0.0,
        "patience": 0,
    },
    "augmented": {
        "epochs": 30,
        "net": "book",
        "schedule": "cosine",
        "warmup": 0,
        "min_lr": 0.0,
        "lr_gamma": None,
        "lr_step": None,
        "augment": "rotation=12,shift=2.5,scale=0.1",
        "weight_decay": 0.0,
        "label_smoothing": 0.0,
        "patience": 0,
    },
}

_AUGMENT_KEYS = ("rotation", "shift", "scale", "shear", "elastic_alpha", "elastic_sigma")


def parse_augment(text: str) -> dict | None:
    """``'none'`` -> None; ``'rotation=12,shift=2.5'`` -> keyword arguments of
    :class:`fastconv.augment.RandomTransform` (validated). Raises ValueError."""
    from ..augment import RandomTransform

    text = text.strip()
    if text in ("none", ""):
        return None
    kwargs = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _AUGMENT_KEYS:
            keys = ", ".join(_AUGMENT_KEYS)
            raise ValueError(f"expected key=value with keys {keys}; got {part!r}")
        try:
            kwargs[key] = float(value)
        except ValueError:
            raise ValueError(f"{key} must be a number, got {value!r}") from None
    RandomTransform(**kwargs)  # validates every value
    return kwargs


def resolve_run_args(args, saved=None) -> list:
    """Fill unset settings from the resumed run (or the recipe's defaults); the conflicts.

    ``epochs`` may grow on resume; everything else must match the run being resumed. Runs saved
    before recipes existed count as "book" runs.
    """
    conflicts = []
    if args.recipe is None:
        args.recipe = (saved or {}).get("recipe", "book")
    elif saved is not None and args.recipe != saved.get("recipe", "book"):
        conflicts.append(
            f"--recipe {args.recipe} (the run being resumed used {saved.get('recipe', 'book')})"
        )
    recipe = RECIPES[args.recipe if args.recipe in RECIPES else "book"]
    if args.epochs is None:
        args.epochs = (saved or {}).get("epochs", recipe["epochs"])
    defaults = {**RUN_DEFAULTS, **{k: v for k, v in recipe.items() if k != "epochs"}}
    for key, default in defaults.items():
        given = getattr(args, key)
        before = saved.get(key, default) if saved is not None else default
        if given is None:
            setattr(args, key, before)
        elif saved is not None and given != before:
            flag = "--" + key.replace("_", "-")
            conflicts.append(f"{flag} {given} (the run being resumed used {before})")
    return conflicts


def check_settings(args) -> str | None:
    """Combinations argparse cannot check; the problem, or None."""
    if args.weight_decay and args.optimizer != "adamw":
        return "--weight-decay needs --optimizer adamw (decoupled weight decay)"
    if not args.label_smoothing < 1:
        return f"--label-smoothing must be in [0, 1), got {args.label_smoothing}"
    if args.warmup and args.schedule != "cosine":
        return "--warmup needs --schedule cosine"
    if args.schedule == "cosine" and args.warmup >= args.epochs:
        return f"--warmup {args.warmup} must be below --epochs {args.epochs}"
    if args.schedule == "plateau" and not args.val_size:
        return "--schedule plateau watches the validation loss: it needs --val-size > 0"
    if args.patience and not args.val_size:
        return "--patience watches the validation accuracy: it needs --val-size > 0"
    return None


def mnist_options(args) -> dict:
    """``load_mnist`` options of the command line (--quiet silences the download's progress
    bar and its notices too)."""
    return {
        "download": not args.no_download,
        "progress": False if args.quiet else None,
    }
