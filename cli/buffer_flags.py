"""The ``buffer.py`` command line: its flags (GeorgeCazenavette/mtt-distillation ``buffer.py``
names and defaults; the GSAM flags of NUS-HPC-AI-Lab/DATM ``buffer/buffer_FTD.py``; the schedule
flags of NUS-HPC-AI-Lab/PAD ``buffer/buffer_CL.py``), resolved once into a frozen :class:`BufferJob`."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import cli
import utils
from pretrained import buffers, experts


@dataclass(frozen=True)
class BufferJob:
    """A resolved ``buffer.py`` command.

    Attributes:
        expert: how each expert trains (``pretrained.experts.ExpertConfig``).
        buffer_path: ``--buffer_path``, the root of the buffers.
        directory: ``{buffer_path}/{dataset}[_NO_ZCA]/{model}``, where the experts go.
        num_experts: experts wanted in the buffer in total (``--num_experts``).
        save_interval: experts per ``replay_buffer_{n}.pt`` file (``--save_interval``).
        test_every: log test accuracy every so many epochs (``--test_every``; 0: never).
        ddp: all ranks train each expert together (``--ddp``).
    """

    expert: experts.ExpertConfig
    buffer_path: str
    directory: str
    num_experts: int
    save_interval: int
    test_every: int
    ddp: bool

    def describe(self) -> dict:
        """The configuration a buffer's manifest records (``ExpertConfig.describe``)."""
        return self.expert.describe(self.save_interval)


# --rm_easy_ratio_*: a fraction of the images removed, never all of them (experts.PadSchedule).
EASY_RATIO = cli.in_range(0.0, 1.0, exclusive_maximum=True)

PAD_FLAGS = ("init_ratio", "add_end_epoch", "rm_epoch_first", "rm_epoch_second", "rm_easy_ratio_first",
             "rm_easy_ratio_second")


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """The ``buffer.py`` flags (MTT names and defaults; DATM's GSAM and PAD's schedule flags)."""
    parser = cli.OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ConvNet", help="expert network (networks.py names)")
    parser.add_argument("--num_experts", type=cli.positive_int, default=100, help="experts wanted in the buffer in total")
    parser.add_argument("--lr_teacher", type=cli.positive_float, default=0.01, help="expert SGD learning rate")
    parser.add_argument("--batch_train", type=cli.positive_int, default=256, help="images per expert SGD step")
    parser.add_argument("--batch_real", type=cli.positive_int, default=256, help="unused (MTT declares it; kept so its commands run)")
    parser.add_argument("--dsa", action=cli.TrueFalseFlag, default=True,
                        help="DiffAugment on every batch (default True); False: DC augmentation crop_scale_rotate")
    parser.add_argument("--dsa_strategy", default="color_crop_cutout_flip_scale_rotate", help="DiffAugment ops joined by _")
    parser.add_argument("--buffer_path", default="./buffers", help="root of the expert buffers")
    parser.add_argument("--train_epochs", type=cli.positive_int, default=50, help="epochs per expert (trajectory = epochs + 1 snapshots)")
    parser.add_argument("--decay", action=argparse.BooleanOptionalAction, default=False,
                        help="lr x0.1 after epoch train_epochs//2+1 (0-based), new optimiser")
    parser.add_argument("--mom", type=cli.non_negative_float, default=0.0, help="SGD momentum")
    parser.add_argument("--l2", type=cli.non_negative_float, default=0.0, help="SGD weight decay")
    parser.add_argument("--save_interval", type=cli.positive_int, default=10, help="experts per replay_buffer_{n}.pt file")
    parser.add_argument("--test_every", type=cli.non_negative_int, default=1, help="log test accuracy every N epochs (0: never)")
    parser.add_argument("--ddp", action="store_true",
                        help="torchrun: all ranks train each expert together (DistributedDataParallel); "
                             "default: the experts are spread over the ranks")
    gsam = parser.add_argument_group("flat experts (DATM buffer_FTD.py: GSAM on every batch)")
    gsam.add_argument("--gsam", action=cli.TrueFalseFlag, default=None,
                      help="GSAM updates (default: on when --rho_max, --rho_min, --alpha or --adaptive is given)")
    gsam.add_argument("--rho_max", type=cli.non_negative_float, default=None, help="GSAM radius at the initial lr (DATM default 2.0)")
    gsam.add_argument("--rho_min", type=cli.non_negative_float, default=None, help="GSAM radius at the decayed lr (default: --rho_max)")
    gsam.add_argument("--alpha", type=cli.non_negative_float, default=None, help="GSAM weight of the removed gradient component (0.4)")
    gsam.add_argument("--adaptive", action=cli.TrueFalseFlag, default=None, help="scale-adaptive perturbation (True)")
    pad = parser.add_argument_group("PAD data schedule (buffer_CL.py)")
    pad.add_argument("--sort_method", default="", help="difficulty file: a path, NAME for {buffer_path}/scores/NAME.pt, "
                     "or EL2N/GraNd/Uncertainty for {buffer_path}/scores/{dataset}_{method}.pt (scripts/score.py)")
    pad.add_argument("--init_ratio", type=cli.in_range(0.0, 1.0, exclusive_minimum=True), default=None, help="fraction of the easiest images at epoch 0 (1.0)")
    pad.add_argument("--add_end_epoch", type=cli.non_negative_int, default=None, help="epoch by which all images are in (100)")
    pad.add_argument("--rm_epoch_first", type=cli.non_negative_int, default=None, help="removal stage 1 after this epoch (40)")
    pad.add_argument("--rm_epoch_second", type=cli.non_negative_int, default=None, help="removal stage 2 after this epoch (60)")
    pad.add_argument("--rm_easy_ratio_first", type=EASY_RATIO, default=None, help="easiest fraction removed in stage 1 (0.1)")
    pad.add_argument("--rm_easy_ratio_second", type=EASY_RATIO, default=None, help="easiest fraction removed in stage 2 (0.1)")
    cli.add_data_args(parser, cifar100_stats_default="cifar10")
    cli.add_runtime_args(parser)
    cli.add_amp_arg(parser)
    return parser


def resolve(args: argparse.Namespace) -> BufferJob:
    """Fill the GSAM and PAD defaults, validate every value, and place the buffer.

    Raises:
        utils.UserError: a value is invalid, or GSAM / PAD flags are given with GSAM / PAD off.
    """
    gsam_given = [name for name in ("rho_max", "rho_min", "alpha", "adaptive") if getattr(args, name) is not None]
    gsam = bool(gsam_given) if args.gsam is None else args.gsam
    if not gsam and gsam_given:
        raise utils.UserError(f"--{gsam_given[0]} is a GSAM setting but --no-gsam is given")
    rho_max = args.rho_max if args.rho_max is not None else (
        args.rho_min if args.rho_min is not None else experts.GSAM_DEFAULTS["rho_max"])
    pad_given = [name for name in PAD_FLAGS if getattr(args, name) is not None]
    if pad_given and not args.sort_method:
        raise utils.UserError(f"--{pad_given[0]} needs --sort_method (the difficulty order it schedules)")
    schedule = None
    if args.sort_method:
        schedule = experts.PadSchedule(**{name: getattr(args, name) for name in pad_given})
    cfg = experts.ExpertConfig(
        dataset=args.dataset, model=args.model, zca=args.zca, subset=args.subset, res=args.res,
        train_epochs=args.train_epochs, lr_teacher=args.lr_teacher, batch_train=args.batch_train, mom=args.mom,
        l2=args.l2, decay=args.decay, dsa=args.dsa, dsa_strategy=args.dsa_strategy, gsam=gsam, rho_max=rho_max,
        rho_min=args.rho_min if args.rho_min is not None else rho_max,
        alpha=args.alpha if args.alpha is not None else experts.GSAM_DEFAULTS["alpha"],
        adaptive=args.adaptive if args.adaptive is not None else experts.GSAM_DEFAULTS["adaptive"],
        sort_method=args.sort_method, schedule=schedule, seed=args.seed)
    cfg.validate()
    return BufferJob(expert=cfg, buffer_path=args.buffer_path, num_experts=args.num_experts,
                     save_interval=args.save_interval, test_every=args.test_every, ddp=args.ddp,
                     directory=buffers.buffer_dir(args.buffer_path, args.dataset, args.model, args.zca, args.subset,
                                                  args.res))
