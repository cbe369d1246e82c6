"""The ``distill.py`` command line: its flags (the reference scripts' names and defaults), the
``--config`` YAML presets, and resolving them once into a frozen ``methods.DistillConfig`` and
``methods.run_config.RunOptions``.

A flag left out takes the chosen method's reference default (``DistillMethod.defaults``: DC/DSA
``main.py`` and DM ``main_DM.py`` of VICO-UoE/DatasetCondensation, ``main_DataDAM.py``, CAFE's
``distill.py``, MTT/DATM/PAD ``distill.py``). A flag the chosen method does not use, and an add-on
it does not host, are refused with one line before anything is loaded.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Tuple

import yaml

import augment
import cli
import methods
import utils
from cli import eval_options, teacher_flags
from methods import addons
from methods.losses import METRICS
from methods.options import shared_flag_range
from methods.run_config import RunOptions
from methods.run_selection import SELECT_ON

# Flags whose default depends on the method (``None`` here, resolved from Method.defaults).
DEFAULT_MODEL = "ConvNet"  # --model where the method's reference names no network for the dataset
METHOD_DEFAULTED = ("ipc", "Iteration", "lr_img", "lr_net", "batch_real", "batch_train", "init", "dsa_strategy",
                    "dis_metric", "eval_mode")


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """The ``distill.py`` flags (reference names; method-dependent defaults are ``None`` until resolved)."""
    parser = cli.OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="YAML file of flag values (configs/METHOD/DATASET_ipcN.yaml); flags given here override it")
    parser.add_argument("--method", default="DC", help=f"one of: {', '.join(methods.list_methods())}")
    parser.add_argument("--model", default=None,
                        help="network to distil with (networks.py names; default: the method's reference network, "
                             "ConvNet for most, ConvNetNN for FRePo, LeNet for DD on MNIST/FashionMNIST)")
    parser.add_argument("--ipc", type=cli.positive_int, default=None, help="images per class (DC/DSA 1, DM 50)")
    parser.add_argument("--eval_mode", default=None, help="evaluation pool: S, SS, M, B, W, D, A, P, N, C (DC S, DM SS; "
                        "M is DC's pool, or MTT's for MTT/DATM/PAD)")
    parser.add_argument("--num_exp", type=cli.positive_int, default=None,
                        help="independent experiments (default: DC/DSA/DM 5, DataDAM/CAFE/MTT/DATM/PAD/FRePo 1)")
    parser.add_argument("--num_eval", type=cli.non_negative_int, default=None,
                        help="networks per evaluation, 0: no evaluation (default: DC/DSA/DM/CAFE 20, DataDAM 10, "
                             "MTT/DATM/PAD/FRePo 5)")
    parser.add_argument("--epoch_eval_train", type=cli.positive_int, default=None,
                        help="evaluation epochs (default: DC/DSA 1000 with augmentation else 300; DM 1000)")
    parser.add_argument("--Iteration", type=cli.non_negative_int, default=None, help="outer iterations (DC/DSA 1000, DM 20000)")
    parser.add_argument("--lr_img", type=cli.positive_float, default=None, help="synthetic image lr (DC/DSA 0.1, DM 1.0)")
    parser.add_argument("--lr_net", type=cli.positive_float, default=None, help="network lr, inner loop and evaluation (0.01)")
    parser.add_argument("--batch_real", type=cli.positive_int, default=None, help="real images per class per step (256)")
    parser.add_argument("--batch_train", type=cli.positive_int, default=None, help="batch for training on the synthetic set (256)")
    parser.add_argument("--init", "--pix_init", dest="init", default=None,
                        help="noise or real (DC/DSA noise, DM/MTT real); DATM/PAD also samples_predicted_correctly (their default)")
    parser.add_argument("--dsa_strategy", default=None,
                        help="DiffAugment ops joined by _ (DSA/DM: color_crop_cutout_flip_scale_rotate; none to disable)")
    parser.add_argument("--dis_metric", default=None, help=f"gradient distance for DC/DSA: {', '.join(METRICS)}")
    parser.add_argument("--outer_loop", type=cli.positive_int, default=None,
                        help="DC/DSA: image updates per iteration, each on a fresh batch of real images "
                             "(default: get_loops(ipc))")
    parser.add_argument("--inner_loop", type=cli.non_negative_int, default=None,
                        help="DC/DSA: network epochs on the synthetic set between image updates, 0: none "
                             "(default: get_loops(ipc))")
    parser.add_argument("--save_path", default="result", help="root of run directories")
    parser.add_argument("--run_dir", default=None, help="run directory (default: save_path/METHOD_DATASET_MODEL_IPCipc)")
    parser.add_argument("--eval_it", type=cli.non_negative_int, default=None,
                        help="evaluate every N iterations, 0 = only at the end (default: DC 500, DM 2000 for S/SS)")
    parser.add_argument("--checkpoint_every", type=cli.non_negative_int, default=100, help="write last.pt every N iterations (0: only on stop)")
    parser.add_argument("--save_every", type=cli.non_negative_int, default=1000,
                        help="MTT/DATM/PAD: also write logged_files/exp{e}/images_{it}.pt, labels_{it}.pt, lr_{it}.pt "
                             "every N iterations (0: only *_best.pt)")
    parser.add_argument("--select_on", default="test", choices=SELECT_ON,
                        help="what each experiment's best-so-far set (best_*.pt) is chosen on, as the mean over the "
                             "evaluation models: test accuracy (the references') or val, a class-balanced validation "
                             "split held out of the training set and of distillation")
    parser.add_argument("--val_per_class", type=cli.positive_int, default=100,
                        help="--select_on val: training images per class held out (drawn from --seed)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                        help="continue from run_dir/last.pt if it exists")
    parser.add_argument("--vis", action=argparse.BooleanOptionalAction, default=True, help="save PNG grids")
    cli.add_data_args(parser, cifar100_stats_default="the method's: cifar10 for MTT, DATM, PAD and CAFE, else cifar100",
                      zca_default="the method's per dataset: FRePo on for CIFAR10, CIFAR100 and TinyImageNet; else off",
                      norm_stats_default="the method's: train for KIP, else dc")
    cli.add_runtime_args(parser)
    cli.add_amp_arg(parser)
    addons.add_args(parser)  # every registered add-on's own flags
    eval_options.add_eval_option_args(parser)
    teacher_flags.add_teacher_args(parser)  # SRe2L, CDA, RDED; any method under --labels soft|teacher
    group = parser.add_argument_group("method-specific (declared by each method's options)")
    # One flag per field of the methods' options dataclasses (methods/options.py).
    for name, (option, users) in methods.method_options().items():
        classes = [methods.get_method_class(user) for user in users]
        defaults = sorted({f"{m.name}: {option_default_text(m, name)}" for m in classes})
        help_text = f"{option.help} (default {'; '.join(defaults)})"
        if option.type is bool:  # --no_aug alone, and the references' --no_aug True / False
            group.add_argument(f"--{name}", action=cli.TrueFalseFlag, default=None, help=help_text)
        elif option.type in (int, float):  # the range the options declare (the loosest where several do)
            declared = [spec for m in classes for spec in m.option_specs() if spec.name == name]
            group.add_argument(f"--{name}", type=shared_flag_range(declared), default=None, help=help_text)
        else:
            group.add_argument(f"--{name}", type=option.type, default=None, help=help_text)
    return parser


def option_default_text(method_class, name: str) -> str:
    """The default of option ``name`` of ``method_class`` as ``--help`` names it: ``per dataset``
    when the method sets it per dataset (``DistillMethod.resolved_defaults``), else its value."""
    if name in method_class.resolved_defaults("CIFAR10", 1, {}):
        return "per dataset"
    return str(getattr(method_class.resolve_options({}), name))


def method_extra(args: argparse.Namespace, method_class) -> dict:
    """The chosen method's options given on the command line; warn about other methods' options.

    Raises:
        utils.UserError: a value is out of range (the message names the flag).
    """
    own = {option.name for option in method_class.option_specs()}
    extra = {}
    for name in methods.method_options():
        value = getattr(args, name)
        if value is None:
            continue
        if name in own:
            extra[name] = value
        else:
            print(f"warning: --{name} is not used by --method {args.method}; ignored", file=sys.stderr)
    try:
        method_class.resolve_options(extra)
    except ValueError as error:
        raise utils.UserError(str(error)) from None
    return extra


def refuse_unused(args: argparse.Namespace, method_class) -> None:
    """Refuse a shared flag the chosen method does not use (``DistillMethod.unused_flags``), so that
    a value is never recorded as if it had been used. ``--dsa_strategy none`` is accepted everywhere.

    Raises:
        utils.UserError: one line naming the flag and the method.
    """
    for name in method_class.unused_flags:
        value = getattr(args, name, None)
        if value is None or (name == "dsa_strategy" and str(value).strip().lower() in ("", "none")):
            continue
        hint = f" ({method_class.unused_hint})" if getattr(method_class, "unused_hint", "") else ""
        raise utils.UserError(f"--{name} {value}: --method {args.method} does not use this flag{hint}; leave it out")


def reference_model(given: Optional[str], method_class, method: str, dataset: str) -> Tuple[str, str]:
    """``(model, note)``: the ``--model`` to distil with, ``given`` or else the method's reference
    network for ``dataset`` (``DistillMethod.reference_network``; ConvNet where the reference names
    none), and, when a given network differs from the reference's, one line naming both ("" else;
    printed on stdout by :func:`resolve` once every flag is valid).

    Args:
        given: ``--model`` as given, or None when left out.
        method_class: the ``DistillMethod`` subclass; method, dataset: the flag values, for the line.
    """
    name, source = method_class.reference_network(dataset)
    if given is None:
        return name or DEFAULT_MODEL, ""
    if name is not None and given != name:
        return given, (f"note: --model {given}: --method {method}'s reference distils {dataset} with {name} "
                       f"({source}); results may differ from the paper's")
    return given, ""


def resolve(args: argparse.Namespace):
    """Fill method defaults, validate every value, and build the frozen (DistillConfig, RunOptions).

    ``args`` is not modified.

    Raises:
        utils.UserError: a flag value is invalid, unused by the method, or asks for an add-on the
            method does not host (the message names the flag).
    """
    try:
        method_class = methods.get_method_class(args.method)
    except KeyError as error:
        raise utils.UserError(f"--method: {error.args[0]}") from None
    refuse_unused(args, method_class)
    defaults = {**{f.name: f.default for f in methods.DistillConfig.__dataclass_fields__.values()},
                **method_class.defaults}
    defaults["Iteration"] = defaults.pop("iterations")
    v = {name: (defaults.get(name) if getattr(args, name) is None else getattr(args, name)) for name in METHOD_DEFAULTED}
    extra = method_extra(args, method_class)
    # The reference's settings per dataset or per option (FRePo: --zca, --use_flip; KIP --kernel
    # conv_rf: RFAD's) for the flags left out.
    derived = dict(method_class.resolved_defaults(args.dataset, v["ipc"], extra))
    derived_zca = bool(derived.pop("zca", False))  # popped either way: it is a data flag, not a method option
    zca = derived_zca if args.zca is None else args.zca
    for name in METHOD_DEFAULTED:
        if name in derived:
            value = derived.pop(name)
            v[name] = value if getattr(args, name) is None else v[name]
    extra = {**derived, **extra}
    data_args = argparse.Namespace(**{**vars(args), "zca": zca})
    num_exp, num_eval = method_class.run_counts
    num_exp = num_exp if args.num_exp is None else args.num_exp
    num_eval = num_eval if args.num_eval is None else args.num_eval
    if v["init"] not in method_class.init_choices:
        raise utils.UserError(f"--init {v['init']!r}: --method {args.method} takes {' or '.join(method_class.init_choices)}")
    if v["dis_metric"] not in METRICS:
        raise utils.UserError(f"--dis_metric {v['dis_metric']!r}: expected one of {', '.join(METRICS)}")
    try:
        augment.validate_strategy(v["dsa_strategy"] or "")
    except ValueError as error:
        raise utils.UserError(str(error)) from None
    model, model_note = reference_model(args.model, method_class, args.method, args.dataset)
    cli.check_models([model], "--model")
    eval_models = cli.resolve_eval_models(v["eval_mode"], model, method_class.pool_family)
    eval_it = args.eval_it
    if eval_it is None:
        eval_it = method_class.default_eval_it if v["eval_mode"] in ("S", "SS") else 0
    try:
        addon_settings = addons.settings_from_flags({**vars(args), "model": model})  # a plain mapping of the parsed values
    except ValueError as error:
        raise utils.UserError(str(error)) from None
    teacher = teacher_flags.teacher_spec(args)
    cfg = methods.DistillConfig(method=args.method, dataset=args.dataset, model=model, ipc=v["ipc"],
                                iterations=v["Iteration"], lr_img=v["lr_img"], lr_net=v["lr_net"],
                                batch_real=v["batch_real"], batch_train=v["batch_train"], init=v["init"],
                                dsa_strategy=v["dsa_strategy"] or "", dis_metric=v["dis_metric"],
                                outer_loop=args.outer_loop, inner_loop=args.inner_loop, zca=zca,
                                subset=args.subset, res=args.res,
                                normalize_like=cli.normalize_like(data_args, method_class.cifar100_stats,
                                                                  method_class.norm_stats), extra=extra,
                                addons=addon_settings, teacher=teacher.as_dict() if teacher is not None else None)
    try:
        addons.check_hosted(method_class, cfg)
        method_class.check_config(cfg)
    except ValueError as error:
        raise utils.UserError(str(error)) from None
    run_dir = args.run_dir or os.path.join(args.save_path, f"{args.method}_{args.dataset}_{model}_{v['ipc']}ipc")
    opts = RunOptions(num_exp=num_exp, num_eval=num_eval, eval_it=eval_it,
                      eval_models=tuple(eval_models), epoch_eval_train=args.epoch_eval_train, seed=args.seed,
                      run_dir=run_dir, checkpoint_every=args.checkpoint_every, resume=args.resume,
                      save_vis=args.vis, save_every=args.save_every, select_on=args.select_on,
                      val_per_class=args.val_per_class, **eval_options.eval_option_values(args))
    if model_note:  # on stdout: a note, not an error (a user mistake stays one line on stderr)
        print(model_note)
    return cfg, opts


def parse_args(argv=None, description: str = "") -> argparse.Namespace:
    """Parse the command line, with ``--config FILE.yaml`` supplying defaults first.

    Precedence: method defaults < the YAML file < flags on the command line (as timm's
    ``train.py``). YAML keys are flag names without dashes (``lr_img``, ``syn_steps``, ...);
    an unknown key is an error rather than silently ignored.

    Raises:
        utils.UserError: the file is missing, is not a YAML mapping, or has unknown keys.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = build_parser(description)
    if known.config:
        parser.set_defaults(**load_config(known.config, parser))
    return parser.parse_args(argv)


# A preset is a short mapping of flags: larger files are refused before they are parsed.
CONFIG_MAX_BYTES = 1 << 20


class PresetLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: ``*name`` references let a few hundred bytes expand
    into gigabytes (a "billion laughs" file), and no preset needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted in a preset",
                                              event.start_mark)
        return super().compose_node(parent, index)


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """The flag values of a preset YAML file (``configs/``), checked against ``parser``'s flags.

    Raises:
        utils.UserError: no such file, larger than :data:`CONFIG_MAX_BYTES`, not UTF-8, not valid
            YAML or holding an alias (:class:`PresetLoader`), not a mapping, or a key that is no flag.
    """
    if not os.path.isfile(path):
        raise utils.UserError(f"--config: no file at {path}")
    size = os.path.getsize(path)
    if size > CONFIG_MAX_BYTES:
        raise utils.UserError(f"--config {path}: {size} bytes; a preset is at most {CONFIG_MAX_BYTES} bytes")
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.load(handle, Loader=PresetLoader) or {}  # noqa: S506 (a SafeLoader without aliases)
    except UnicodeDecodeError:
        raise utils.UserError(f"--config {path}: not UTF-8 text") from None
    except yaml.YAMLError as error:
        raise utils.UserError(f"--config {path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(values, dict):
        raise utils.UserError(f"--config {path}: expected a mapping of flag names to values")
    actions = {action.dest: action for action in parser._actions}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise utils.UserError(f"--config {path}: unknown keys {', '.join(unknown)} (keys are distill.py flag names)")
    converted = {}
    for key, value in values.items():
        try:
            converted[key] = yaml_value(actions[key], value)
        except ValueError as error:
            raise utils.UserError(f"--config {path}: {key}: {error}") from None
    return converted


TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def yaml_value(action: argparse.Action, value):
    """A YAML value checked and converted as the command line would for the flag ``action``:
    booleans (``resume: no``, ``vis: "false"``) become ``bool``; an integer flag refuses ``1.7``;
    YAML strings such as ``1e-7`` (no dot) get the flag's type; a number outside the flag's
    declared range (``flag_types.Range``) is refused as on the command line.

    Raises:
        ValueError: the value does not fit the flag (the message says what was expected).
    """
    boolean = isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction,
                                  argparse._StoreFalseAction, cli.TrueFalseFlag))
    if boolean:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return value.strip().lower() in TRUE_WORDS
        raise ValueError(f"{value!r} is not true or false")
    if value is None or action.nargs in ("+", "*"):
        return value
    convert = action.type
    kind = convert.kind if isinstance(convert, cli.Range) else convert
    if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
        raise ValueError(f"{value!r} is not an integer")
    if convert is not None and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        try:
            converted = convert.convert(value) if isinstance(convert, cli.Range) else convert(value)
        except (TypeError, ValueError):
            expected = {int: "an integer", float: "a number"}.get(kind, f"a {getattr(kind, '__name__', 'value')}")
            raise ValueError(f"{value!r} is not {expected}") from None
        if isinstance(convert, cli.Range) and converted is not None:
            return convert(converted)  # the flag's declared range (cli.RangeError is a ValueError)
        return converted
    return value
