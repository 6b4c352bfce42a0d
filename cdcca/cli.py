"""``cdcca``: the command line. Each verb prints a human table and can write a JSON report.

Building the parser imports nothing heavy (no torch, transformers, peft, bitsandbytes, onnxruntime, zenoh), so
``--help`` and a typo answer at once; the defaults it shows are written out here and ``tests/test_cli_help.py``
checks each one against the field of the config dataclass it feeds. Heavy imports happen inside the verbs.

Errors follow one rule (issue 17, "Errors"): a user-facing failure is one line on stderr that says what to do, exit
code 2; Ctrl-C at any point is one line, ``interrupted``, exit code 130; anything unexpected is one line and exit
code 1, with the traceback only under ``--verbose``. The line format is argparse's own (``cdcca VERB: error: ...``,
the convention of the Python ``argparse`` documentation), so option errors and run-time errors read alike.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from cdcca.errors import CdccaError
from cdcca.paths import write_atomic

VERBS = {
    "pretrain": "train the embedded teacher and student on digits-shift (resumable; cached)",
    "eval": "score checkpoints per domain and task: VQA, MC, BLEU-4, CIDEr-D",
    "info": "parameter counts and the trainable set (LoRA, queries, norms, biases) of a preset",
    "demo": "the main job: cloud trainer and a robot as two processes on loopback, adapting round by round",
    "edge": "run a robot: frames from a bag, folder or RealSense through the student, UTS uplink, hot-swaps",
    "cloud": "run the cloud trainer: durable buffer, teacher + AKD rounds per robot, signed DWC deltas",
    "export": "export the student for the edge: `export --backend onnx` (ONNX Runtime, LoRA adapters)",
    "make-bag": "write the digits-shift stream as a rosbag2 (camera, prompts, ground truth) for replay",
    "keys": "Ed25519 signing keys for weight deltas: `keys generate|trust|list|revoke|endorse|accept` (rotation)",
    "bench": "benchmarks: `bench uplink|downlink|adapt|edge|fleet` (UTS, DWC, Tables 1-4, torch vs ONNX, fleets)",
    "status": "live view of the robots and the cloud on the link: versions, queues, rounds, rejections",
}

EXAMPLES = {
    "pretrain": ["cdcca pretrain                       # the tiny preset into the cache; resumes where it stopped",
                 "cdcca pretrain --preset test --out /tmp/ckpt"],
    "eval": ["cdcca eval --limit 50 --domains source printed --plot eval.png",
             "cdcca eval --model ~/models/blip2-opt-2.7b     # one BLIP-2 checkpoint folder"],
    "info": ["cdcca info --preset tiny"],
    "demo": ["cdcca demo --rounds 3 --json demo.json"],
    "edge": ["cdcca edge --source bag:stream --trust ~/.cache/cdcca/trust",
             "cdcca edge --model ckpt/ --source dir:frames/ --prompt 'what digit is shown?' --link link.json"],
    "cloud": ["cdcca cloud --model ckpt/ --key ~/.cache/cdcca/keys/cloud-1.key",
              "cdcca cloud --link link.json --codec fp16 --round-size 32"],
    "export": ["cdcca export --backend onnx --model ckpt/ --out ckpt/student_onnx"],
    "make-bag": ["cdcca make-bag stream --domains printed --limit 20 --storage mcap"],
    "keys": ["cdcca keys generate --key-id cloud-1", "cdcca keys trust cloud-1.pub --store ~/.cache/cdcca/trust",
             "cdcca keys list"],
    "bench": ["cdcca bench uplink --threads 2 --json bench/results/uplink.json",
              "cdcca bench adapt --methods source-only pl cdcca --seeds 0"],
    "status": ["cdcca status                         # live table until Ctrl-C",
               "cdcca status --once 5 --as-json      # listen 5 s, print one JSON snapshot"],
}  # fmt: skip

# What the verbs feed into config dataclasses, written out so that building the parser imports no torch;
# tests/test_cli_help.py checks every one against its dataclass field (and these names against the registries).
PRESET_NAMES = ("test", "tiny")  # cdcca.models.presets.PRESETS
# cdcca.dwc.CODECS
CODEC_NAMES = ("fp16", "nf4", "nf4-zstd", "sparse-sign", "sparse-sign-ref", "ecsq", "ecdq", "subspace")
DEFAULT_ENDPOINT = "tcp/127.0.0.1:7447"  # cdcca.transport.DEFAULT_ENDPOINT
MEASURING_VERBS = ("pretrain", "eval", "bench", "demo")  # their JSON reports carry report.environment(), wall_s
DOMAIN_NAMES = ("source", "colour_inverted", "printed", "noisy_rotated", "rephrased")  # cdcca.data.digits_shift
TASK_NAMES = ("vqa", "mc", "caption")  # cdcca.data.sample.TASKS
PRETRAIN_DEFAULTS = {"vision_steps": 1000, "teacher_steps": 500, "student_steps": 300, "batch_size": 64, "seed": 0}
CLOUD_DEFAULTS = {"round_size": 64, "max_round_samples": 256, "replay": 0, "codec": "subspace"}
CLOUD_SERVICE_DEFAULTS = {"metrics_address": "127.0.0.1", "status_every_s": 2.0, "comeback_after_s": 10.0,
                          "adapter_cache": 4, "lease_s": 600.0}
AKD_DEFAULTS = {"check_fraction": 0.0, "check_min": 3, "pseudo_label_keep": 1.0, "steps": 60, "lr": 1e-3, "seed": 0}
EDGE_DEFAULTS = {"robot_id": "r1", "queue_capacity": 1024, "batch_size": 8}
REPLAY_DEFAULTS = {"speed": 1.0, "rate_hz": 0.0}
DEMO_DEFAULTS = {"rounds": 3, "stream_images": 150, "test_images": 100, "port": 7447}
BENCH_METHODS = ("source-only", "tent", "cotta", "pkd", "cwd", "pl", "cdcca")  # AdaptBenchConfig.methods
CLOUD_ONLY_MODULES = ("torch", "transformers", "peft", "bitsandbytes", "onnx", "sklearn", "pycocoevalcap",
                      "matplotlib", "psycopg", "cyclonedds")  # pyproject.toml's [cloud] extra (`cloud --dds`)
EDGE_EXTRA_MODULES = {"pyrealsense2": "a RealSense camera", "cyclonedds": "a ROS 2 graph over DDS"}  # [edge] extra
HEAVY_MODULES = ("torch", "transformers", "peft", "bitsandbytes", "onnxruntime", "zenoh")
THIRD_PARTY_WARNINGS = r"(torch|torchvision|transformers|peft|bitsandbytes|onnx|onnxruntime|accelerate|zenoh)(\.|$)"


# ------------------------------------------------------------------------------------------ argument types
def _number(kind, name: str, low=None, high=None, low_open=False, high_open=False):
    """An argparse ``type`` that parses ``kind`` and checks a range, so a bad value fails before anything loads."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {name}, got {text}")
        return value

    return parse


positive_int = _number(int, "a positive integer", low=1)
non_negative_int = _number(int, "an integer >= 0", low=0)
positive_float = _number(float, "a number > 0", low=0, low_open=True)
non_negative_float = _number(float, "a number >= 0", low=0)
keep_fraction = _number(float, "a fraction in (0, 1]", low=0, high=1, low_open=True)
held_out_fraction = _number(float, "a fraction in [0, 1)", low=0, high=1, high_open=True)
port_number = _number(int, "a port in 1..65535", low=1, high=65535)
thread_count = _number(int, "a thread count in 1..1024", low=1, high=1024)  # 99999 made OpenBLAS crash the process
seed_number = _number(int, "a seed in 0..2**63-1", low=0, high=2**63 - 1)  # numpy and torch take no more


def robot_id(text: str) -> str:
    """``--robot-id``: checked at parse, before it names a folder (``../../x`` made one outside the cache)."""
    from cdcca.wire.topics import ROBOT_ID, ROBOT_ID_RULE

    if not ROBOT_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be {ROBOT_ID_RULE}, got {text!r}")
    return text


def store_spec(text: str) -> str:
    """``--store``: a ``postgresql://`` URL or a SQLite file path (checked at parse, before a model loads)."""
    if "://" in text and not text.startswith(("postgresql://", "postgres://")):
        raise argparse.ArgumentTypeError(f"expected a postgresql:// URL or a SQLite file path, got {text!r}")
    return text


def _linger(text: str) -> float:
    value = _number(float, "a number of seconds (-1: until Ctrl-C)")(text)
    if value < 0 and value != -1:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, or -1 for until Ctrl-C, got {text}")
    return value


# ---------------------------------------------------------------------------------------------- the parser
class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's examples as written and adds ``(default: X)`` where a default says something."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=min(120, max(80, _terminal_columns())))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS))
        if shown and "default" not in text:
            value = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
            text += f" (default: {value})"
        return text


def _terminal_columns() -> int:
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):
        return 100


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``cdcca VERB: error: ...; see cdcca VERB --help`` and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _Version(argparse.Action):
    """``--version``: the installed package's version, or ``cdcca.__version__`` from a source tree."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser._print_message(f"cdcca {package_version()}\n", sys.stdout)  # argparse's own version action does so
        parser.exit(0)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cdcca")
    except PackageNotFoundError:
        import cdcca

        return cdcca.__version__


def _common_args(parser: argparse.ArgumentParser, threads: str = "torch's") -> None:
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    parser.add_argument("--threads", type=thread_count, default=None, help=f"torch CPU threads (default: {threads})")
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="third-party warnings, DEBUG logging and tracebacks")  # fmt: skip


def _add_model_dir(parser: argparse.ArgumentParser, what: str = "teacher/ and student/") -> None:
    """``--model DIR``, the one name of the model folder; ``--checkpoints`` stays as a hidden alias."""
    parser.add_argument("--model", dest="checkpoints", type=Path, default=None, metavar="DIR",
                        help=f"model folder holding {what} (default: the preset's, in the cache)")  # fmt: skip
    parser.add_argument("--checkpoints", dest="checkpoints", type=Path, default=None, help=argparse.SUPPRESS)


def _add_preset(parser: argparse.ArgumentParser, text: str = "preset whose checkpoints are used") -> None:
    parser.add_argument("--preset", default="tiny", choices=PRESET_NAMES, help=text)


def _add_pretrain_args(parser: argparse.ArgumentParser) -> None:
    _add_preset(parser, "model preset (sizes)")
    parser.add_argument("--vision-steps", type=positive_int, default=PRETRAIN_DEFAULTS["vision_steps"],
                        help="steps of the shared vision encoder")  # fmt: skip
    parser.add_argument("--teacher-steps", type=positive_int, default=PRETRAIN_DEFAULTS["teacher_steps"],
                        help="steps of the teacher")  # fmt: skip
    parser.add_argument("--student-steps", type=positive_int, default=PRETRAIN_DEFAULTS["student_steps"],
                        help="steps of the student")  # fmt: skip
    parser.add_argument(
        "--batch-size", type=positive_int, default=PRETRAIN_DEFAULTS["batch_size"], help="images per step"
    )
    parser.add_argument("--seed", type=seed_number, default=PRETRAIN_DEFAULTS["seed"], help="random seed")
    parser.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="auto",
                        help="bf16: forward passes under bfloat16 autocast (float32 weights), about 1.2x faster on a "
                             "CPU with AMX or AVX512-BF16 (the committed pair's); fp32: float32 throughout; auto "
                             "(default): bf16 where the CPU has those units, else fp32; a pair or an interrupted build "
                             "in --out goes on in the precision it was started in")  # fmt: skip
    parser.add_argument("--model", "--out", dest="out", type=Path, default=None, metavar="DIR",
                        help="model folder to write, the one other verbs take as --model (default: the preset's, in "
                             "the cache)")  # fmt: skip


def _add_eval_args(parser: argparse.ArgumentParser) -> None:
    _add_preset(parser, "preset whose pretrained pair is evaluated")
    parser.add_argument("--model", dest="model", nargs="+", default=None, metavar="DIR|NAME",
                        help="a model folder holding teacher/ and student/, one checkpoint folder (config.json), "
                             "or 'teacher'/'student' of the preset's pair (default: teacher student)")  # fmt: skip
    parser.add_argument("--checkpoints", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--domains", nargs="+", default=list(DOMAIN_NAMES), choices=DOMAIN_NAMES, metavar="DOMAIN",
                        help="domains to score")  # fmt: skip
    parser.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES, help="tasks to score")
    parser.add_argument("--split", default="test", choices=["stream", "test"], help="split of each domain")
    parser.add_argument("--limit", type=positive_int, default=None, help="images per domain (default: the split)")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="questions answered together")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG bar chart of accuracy per domain")


def _add_link_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="loopback/peer Zenoh endpoint of the cloud")
    parser.add_argument("--link", type=Path, default=None, metavar="FILE",
                        help="JSON link configuration (mode, listen, connect, TLS files, user/password)")  # fmt: skip


def _add_edge_args(parser: argparse.ArgumentParser) -> None:
    _add_preset(parser)
    _add_model_dir(parser, "student/")
    _add_link_args(parser)
    parser.add_argument("--robot-id", type=robot_id, default=EDGE_DEFAULTS["robot_id"],
                        help="this robot's id on the link")  # fmt: skip
    parser.add_argument("--source", required=True, help=f"{SOURCE_FORMS} (DDS)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="prompt asked about every frame of a folder, camera or bag without /cdcca/prompt "
                             "(repeatable)")  # fmt: skip
    parser.add_argument("--prompts-file", type=Path, default=None, metavar="FILE",
                        help="prompts, one per line (blank lines, # comments skipped), as --prompt")  # fmt: skip
    parser.add_argument("--topic", default=None, metavar="TOPIC",
                        help="bag:PATH only: the camera topic to replay (as bag:PATH#TOPIC; default: the first "
                             "Image/CompressedImage topic)")  # fmt: skip
    parser.add_argument("--state", type=Path, default=None, help="uplink queue + adapter state (default: cache)")
    parser.add_argument("--trust", type=Path, default=None, help="trust store of signing keys (default: cache)")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx"],
                        help="what answers: torch, or ONNX Runtime on `cdcca export`'s files")  # fmt: skip
    parser.add_argument(
        "--batch-size", type=positive_int, default=EDGE_DEFAULTS["batch_size"], help="queries answered together"
    )
    parser.add_argument("--rate", type=non_negative_float, default=REPLAY_DEFAULTS["speed"],
                        help="recordings: replay speed, a multiple of the recorded rate as `ros2 bag play --rate` "
                             "(0: as fast as possible)")  # fmt: skip
    parser.add_argument("--query-rate", type=non_negative_float, default=REPLAY_DEFAULTS["rate_hz"],
                        help="queries per second at most (0: no limit)")  # fmt: skip
    parser.add_argument("--linger", type=_linger, default=None,
                        help="after the source ends: a recording exits once the cloud acknowledged its uplink, "
                             "waiting at most this many seconds (default 30); other sources keep serving this long "
                             "(default: until Ctrl-C); -1: until Ctrl-C")  # fmt: skip
    parser.add_argument("--show-answers", action="store_true",
                        help="print each answer: stamp, prompt, answer, entropy, adapter version")  # fmt: skip
    parser.add_argument("--answers-file", type=Path, default=None, metavar="FILE",
                        help="append each answer to this JSON Lines file (one object per answer)")  # fmt: skip
    parser.add_argument("--metrics-port", type=port_number, default=None, metavar="PORT",
                        help="serve Prometheus metrics (cdcca_edge_*) on this port (default: off)")  # fmt: skip
    parser.add_argument("--metrics-address", "--metrics-addr", dest="metrics_addr", default="0.0.0.0", metavar="ADDR",
                        help="address the metrics server binds (127.0.0.1: this machine only; a robot's metrics are "
                             "scraped from elsewhere, so every interface by default)")  # fmt: skip
    parser.add_argument("--status-line", action=argparse.BooleanOptionalAction, default=None,
                        help="a one-line status rewritten in place (default: when stdout is a terminal)")  # fmt: skip
    parser.add_argument("--cloud-warn-after", type=positive_float, default=5.0, metavar="SECONDS",
                        help="warn when no cloud has been seen for this long (answers continue meanwhile)")  # fmt: skip
    parser.add_argument("--wait-updates", type=non_negative_int, default=0, metavar="N",
                        help="a recording: after the uplink drained, wait (within --linger) for N new adapter "
                             "versions, so offline adaptation ends with the adapted student applied")  # fmt: skip
    parser.add_argument("--queue-capacity", type=positive_int, default=EDGE_DEFAULTS["queue_capacity"],
                        help="uplink samples kept on disk while the cloud is away")  # fmt: skip


def _add_cloud_args(parser: argparse.ArgumentParser) -> None:
    _add_preset(parser)
    _add_model_dir(parser, "teacher/ and student/")
    _add_link_args(parser)
    parser.add_argument("--dds", action="store_true",
                        help="join the robots' ROS 2 graph directly over DDS (topics /cdcca/<topic>; ROS_DOMAIN_ID, "
                             "ROS_AUTOMATIC_DISCOVERY_RANGE) instead of Zenoh: a cloud on the robots' LAN")  # fmt: skip
    parser.add_argument("--state", type=Path, default=None, help="SQLite store and round log (default: cache)")
    parser.add_argument("--store", type=store_spec, default=None, metavar="URL",
                        help="the store, if not --state's SQLite file: postgresql://USER@HOST/DB, shared by the "
                             "workers of a fleet (see the README's Fleet section)")  # fmt: skip
    parser.add_argument("--key", type=Path, default=None, help="Ed25519 signing key (default: cache/keys/cloud-1.key)")
    parser.add_argument("--round-size", type=positive_int, default=CLOUD_DEFAULTS["round_size"],
                        help="new uploads of a robot that make a round (one per frame, with each of its uncertain "
                             "prompts)")  # fmt: skip
    parser.add_argument("--max-round-samples", type=positive_int, default=CLOUD_DEFAULTS["max_round_samples"],
                        help="most new samples one round trains on, in whole uploads")  # fmt: skip
    parser.add_argument("--replay", type=non_negative_int, default=CLOUD_DEFAULTS["replay"],
                        help="samples of earlier rounds trained on again with each round's new ones")  # fmt: skip
    parser.add_argument("--check-fraction", type=held_out_fraction, default=AKD_DEFAULTS["check_fraction"],
                        help="share of a round's samples held out; the round keeps the weights that agree best "
                             "with the teacher on them (0: off)")  # fmt: skip
    parser.add_argument("--check-min", type=non_negative_int, default=AKD_DEFAULTS["check_min"],
                        help="fewest held-out samples a check may rest on (smaller rounds go unchecked)")  # fmt: skip
    parser.add_argument("--pseudo-label-keep", type=keep_fraction, default=AKD_DEFAULTS["pseudo_label_keep"],
                        help="fraction of samples, the teacher's most confident, a round trains on")  # fmt: skip
    parser.add_argument("--flush-after", type=positive_float, default=None,
                        help="seconds after which fewer than --round-size samples still make a round")  # fmt: skip
    parser.add_argument("--codec", default=CLOUD_DEFAULTS["codec"], metavar="CODEC",
                        help=f"DWC codec of the deltas, one of: {', '.join(CODEC_NAMES)}")  # fmt: skip
    parser.add_argument(
        "--steps", type=positive_int, default=AKD_DEFAULTS["steps"], help="AKD optimizer steps per round"
    )
    parser.add_argument("--lr", type=positive_float, default=AKD_DEFAULTS["lr"], help="AKD learning rate")
    parser.add_argument("--seed", type=seed_number, default=AKD_DEFAULTS["seed"], help="random seed of AKD")
    parser.add_argument("--metrics-port", type=port_number, default=None, metavar="PORT",
                        help="serve Prometheus metrics (cdcca_cloud_*) on this port (default: off)")  # fmt: skip
    parser.add_argument("--metrics-address", "--metrics-addr", dest="metrics_address",
                        default=CLOUD_SERVICE_DEFAULTS["metrics_address"], metavar="ADDR",
                        help="address the metrics server binds (0.0.0.0: every interface)")  # fmt: skip
    parser.add_argument("--status-every", type=non_negative_float, default=CLOUD_SERVICE_DEFAULTS["status_every_s"],
                        metavar="SECONDS", help="publish the cloud's status on the link this often (0: off)")
    parser.add_argument("--comeback-after", type=non_negative_float, default=CLOUD_SERVICE_DEFAULTS["comeback_after_s"],
                        metavar="SECONDS",
                        help="after giving up on a robot, resend when it shows up again this much later")  # fmt: skip
    parser.add_argument("--adapter-cache", type=non_negative_int, default=CLOUD_SERVICE_DEFAULTS["adapter_cache"],
                        metavar="N", help="robots whose adapter state stays in memory besides the one training "
                                          "(LRU); the others load from --state at their next round")  # fmt: skip
    parser.add_argument("--worker-id", default=None, metavar="NAME",
                        help="one of several workers sharing --state: each claims due rounds with a lease")  # fmt: skip
    parser.add_argument("--lease", type=positive_float, default=CLOUD_SERVICE_DEFAULTS["lease_s"], metavar="SECONDS",
                        help="how long a claimed round stays this worker's; longer than a round takes")  # fmt: skip


def _add_status_args(parser: argparse.ArgumentParser) -> None:
    _add_link_args(parser)
    parser.add_argument("--once", type=non_negative_float, default=None, metavar="SECONDS",
                        help="listen this long, print one table and exit (default: live until Ctrl-C)")  # fmt: skip
    parser.add_argument("--as-json", action="store_true", help="print the snapshot as JSON instead of a table")


def _add_demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=positive_int, default=DEMO_DEFAULTS["rounds"],
                        help="adaptation rounds to wait for")  # fmt: skip
    parser.add_argument("--stream-images", type=positive_int, default=DEMO_DEFAULTS["stream_images"],
                        help="stream images per target domain replayed through the robot")  # fmt: skip
    parser.add_argument("--test-images", type=positive_int, default=DEMO_DEFAULTS["test_images"],
                        help="held-out test images per target domain")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=None, help="state of the run (default: cache/demo)")
    parser.add_argument("--port", type=port_number, default=DEMO_DEFAULTS["port"], help="loopback port of the cloud")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: beside the JSON)")


def _add_make_bag_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="bag folder to create (must not exist)")
    parser.add_argument("--domains", nargs="+", default=list(DOMAIN_NAMES[1:]), choices=DOMAIN_NAMES, metavar="DOMAIN",
                        help=f"domains to record, of: {' '.join(DOMAIN_NAMES)}")  # fmt: skip
    parser.add_argument("--split", default="stream", choices=["train", "stream", "test"], help="split recorded")
    parser.add_argument("--limit", type=positive_int, default=None, help="images per domain (default: the split)")
    parser.add_argument("--storage", default="mcap", choices=["mcap", "sqlite3"], help="rosbag2 storage")


KEY_ACTIONS = {
    "generate": "generate a key pair for the cloud (keep the .key there, give the .pub to robots)",
    "trust": "add a .pub to a robot's trust store (refuses another key under a trusted id unless --replace)",
    "list": "list the trust store: trusted and revoked keys with their SHA-256 fingerprints",
    "revoke": "revoke a key id on this robot, or with --key write a signed revocation for robots to accept",
    "endorse": "sign (with a trusted --key) a statement that robots trusting it may trust a new .pub",
    "accept": "accept a signed statement (an endorsement or a revocation) into the trust store",
}

KEY_EXAMPLES = {
    "generate": "cdcca keys generate --key-id cloud-2 --dir ~/.cache/cdcca/keys",
    "trust": "cdcca keys trust cloud-1.pub --store ~/.cache/cdcca/trust",
    "list": "cdcca keys list --store ~/.cache/cdcca/trust",
    "revoke": "cdcca keys revoke cloud-1 --key cloud-2.key --out cloud-1.revoke.json",
    "endorse": "cdcca keys endorse cloud-2.pub --key cloud-1.key --out cloud-2.trust.json",
    "accept": "cdcca keys accept cloud-2.trust.json --store ~/.cache/cdcca/trust",
}


def _add_keys_args(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=_Parser)
    for action, text in KEY_ACTIONS.items():
        example = f"example:\n  {KEY_EXAMPLES[action]}"
        p = actions.add_parser(action, help=text, description=text, epilog=example, formatter_class=_Formatter)
        p.set_defaults(target=None, store=None, key=None, out=None, dir=None, key_id="cloud-1", replace=False)
        _common_args(p)
        if action == "generate":
            p.add_argument("--key-id", default="cloud-1", help="name of the new key")
            p.add_argument("--dir", type=Path, default=None, help="key folder (default: cache/keys)")
            continue
        target = {"trust": ("PUBFILE", "the .pub file to trust"), "revoke": ("KEY_ID", "the key id to revoke"),
                  "endorse": ("PUBFILE", "the new key's .pub file"),
                  "accept": ("STATEMENT", "the statement file")}.get(action)  # fmt: skip
        if target is not None:
            p.add_argument("target", metavar=target[0], help=target[1])
        if action != "endorse":
            p.add_argument("--store", type=Path, default=None, help="trust store folder (default: cache/trust)")
        if action == "trust":
            p.add_argument(
                "--replace",
                action="store_true",
                help="replace a different key already trusted under the same id (a deliberate rotation)",
            )
        if action in ("revoke", "endorse"):
            p.add_argument("--key", type=Path, default=None,
                           help="the trusted private key (.key) that signs the statement")  # fmt: skip
            p.add_argument("--out", type=Path, default=None,
                           help="statement file (default: cache/keys/<id>.<action>.json)")  # fmt: skip


BENCH_KINDS = {
    "uplink": "bytes per frame of raw / JPEG / all tokens / UTS stage 1 / stage 1+2 on the target stream",
    "downlink": "one adaptation round, then bytes, bits per parameter, time and accuracy per DWC codec; hot-swap",
    "adapt": "the continual stream against the baselines (Tables 1-4): accuracy, gap closed, source drop",
    "edge": "torch eager vs ONNX Runtime: per-answer latency, memory, UTS overhead, swaps under load",
    "fleet": "N light robots on Zenoh against 1 and 2 cloud workers: RSS per robot, rounds/min, update latency",
}


def _add_bench_args(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="which", metavar="BENCHMARK", required=True, parser_class=_Parser)
    for which, text in BENCH_KINDS.items():
        one_thread = which in ("downlink", "edge", "fleet")  # the committed runs: one thread each side
        example = (f"example:\n  OMP_NUM_THREADS=1 cdcca bench {which} --json bench/results/{which}.json" if one_thread
                   else f"example:\n  cdcca bench {which} --threads 2 --json bench/results/{which}.json")  # fmt: skip
        p = kinds.add_parser(which, help=text, description=text, epilog=example, formatter_class=_Formatter)
        p.set_defaults(steps=None, images_per_domain=80, seeds=[0, 1, 2], stream_images=150, no_ablations=False,
                       methods=None, shifts=None)  # fmt: skip
        _common_args(p)
        _add_preset(p, "preset whose pretrained student is measured")
        _add_model_dir(p)
        p.add_argument("--plot", type=Path, default=None, help="PNG (default: beside the JSON)")
        if which == "fleet":
            from cdcca.benchmarks.fleet_cli import add_fleet_arguments  # argparse only: nothing heavy

            add_fleet_arguments(p)
        if which == "uplink":
            p.add_argument("--images-per-domain", type=positive_int, default=80, help="stream images per domain")
        if which == "downlink":
            p.add_argument("--steps", type=positive_int, default=150, help="optimizer steps of the round")
        if which == "adapt":
            p.add_argument("--steps", type=positive_int, default=None,
                           help="optimizer steps per round (default: the benchmark's, 60)")  # fmt: skip
            p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the headline table")
            p.add_argument("--stream-images", type=positive_int, default=150, help="stream images per domain")
            p.add_argument("--no-ablations", action="store_true", help="skip Tables 3 and 4")
            p.add_argument("--workers", type=positive_int, default=None,
                           help="processes running the (method, seed) runs side by side, --threads split between "
                                "them (default: --threads, one thread each)")  # fmt: skip
            p.add_argument("--methods", nargs="+", default=None, choices=BENCH_METHODS, metavar="METHOD",
                           help=f"methods of the headline table, of: {' '.join(BENCH_METHODS)} (default: all; "
                                "source-only and cdcca are always run)")  # fmt: skip
            p.add_argument("--shifts", default=None, metavar="FILE.py[:NAME]",
                           help="run the stream on shifts a Python file declares, a sequence of DomainSpec called NAME "
                                "(default SHIFTS), instead of the committed target domains; e.g. "
                                "bench/heldout_shifts.py:SEALED")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; imports no heavy module (see the module docstring)."""
    parser = _Parser(
        prog="cdcca",
        description="Cloud-device collaborative continual adaptation for multimodal LLMs (CVPR 2024).",
        formatter_class=_Formatter,
        epilog="verbs:\n"
        + "\n".join(f"  {verb:<10} {text}" for verb, text in VERBS.items())
        + "\n\n`cdcca VERB --help` shows a verb's options and an example.",
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show third-party warnings, DEBUG logging and tracebacks")  # fmt: skip
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True, parser_class=_Parser, help="listed below")
    for verb, text in VERBS.items():
        examples = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[verb])
        p = sub.add_parser(verb, description=text, epilog=examples, formatter_class=_Formatter)
        if verb in ("keys", "bench"):  # their actions carry their own options and help
            (_add_keys_args if verb == "keys" else _add_bench_args)(p)
            continue
        _common_args(p, "2 for the robot and the cloud, torch's for pretraining" if verb == "demo" else "torch's")
        if verb in ("pretrain", "demo"):
            _add_pretrain_args(p)
        if verb == "demo":
            _add_demo_args(p)
        if verb == "edge":
            _add_edge_args(p)
        if verb == "cloud":
            _add_cloud_args(p)
        if verb == "export":
            _add_preset(p)
            _add_model_dir(p, "student/")
            p.add_argument("--backend", default="onnx", choices=["onnx"], help="export format")
            p.add_argument("--out", type=Path, default=None, help="output folder (default: MODEL/student_onnx)")
            p.add_argument("--mc-layers", type=positive_int, default=1, metavar="N",
                           help="final encoder layers UTS stage 2 runs stochastically; must match the robot's "
                                "UTSConfig.mc_layers")  # fmt: skip
            from cdcca.edge.onnx_model import UTS_PRECISIONS

            p.add_argument("--uts-precision", default=UTS_PRECISIONS[0], choices=UTS_PRECISIONS,
                           help="how uts.onnx runs UTS stage 2's linear layers: int8 (about twice as fast on "
                                "one core, bench/edge.md) or fp32")  # fmt: skip
        if verb == "eval":
            _add_eval_args(p)
        if verb == "info":
            _add_preset(p, "preset whose sizes are counted")
        if verb == "make-bag":
            _add_make_bag_args(p)
        if verb == "status":
            _add_status_args(p)
    return parser


def cmd_pretrain(args) -> dict:
    import torch

    from cdcca.pretrain import EMBEDDED_THREADS, PretrainConfig, pretrain
    from cdcca.report import format_table

    config = PretrainConfig(
        preset=args.preset,
        vision_steps=args.vision_steps,
        teacher_steps=args.teacher_steps,
        student_steps=args.student_steps,
        batch_size=args.batch_size,
        seed=args.seed,
        out_dir=args.out,
        precision=args.precision,
    )
    if config.preset == "tiny" and torch.get_num_threads() != EMBEDDED_THREADS:
        print(f"cdcca pretrain: warning: {torch.get_num_threads()} torch threads; the committed results' pair was "
              f"built with --threads {EMBEDDED_THREADS}, and another count builds slightly different weights",
              file=sys.stderr)  # fmt: skip
    started = time.perf_counter()
    report = pretrain(config)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(
        format_table(
            report["stages"],
            ["stage", "reused", "steps", "resumed_from", "final_loss", "seconds"],
            title=f"pretrain {config.preset} -> {config.out_dir} ({report['precision']}, {report['seconds']} s)",
        )
    )
    for stage in report["stages"]:  # a snapshot trained on another encoder: the stage started again (logged too)
        if stage.get("discarded"):
            print(f"{stage['stage']}: snapshot discarded, the stage started again: {stage['discarded']}")
    return report


def _resolve_models(args) -> dict[str, Path]:
    """``eval --model``: names of the pair ('teacher', 'student'), pair folders (teacher/ and/or student/ inside) or
    single checkpoint folders (config.json), any mix; the hidden ``--checkpoints`` still names the pair folder.
    Each pair folder gives the named models (default both; keyed ``<folder>/<name>`` when there are several), and
    a path that is none of these is an error (a typo was silently dropped before)."""
    from cdcca.paths import checkpoint_dir

    names, singles, pairs = [], {}, [Path(args.checkpoints)] if args.checkpoints else []
    for item in args.model or []:
        path = Path(item).expanduser()
        if item in ("teacher", "student"):
            names.append(item)
        elif (path / "config.json").is_file():
            singles[item] = path
        elif any((path / name).is_dir() for name in ("teacher", "student")):
            pairs.append(path)
        elif path.exists():
            raise CdccaError(f"--model {item}: not a checkpoint folder (no config.json) nor a pair folder (no "
                             "teacher/ or student/ in it); `cdcca pretrain` writes a pair")  # fmt: skip
        else:
            raise CdccaError(f"--model {item}: no such folder (and not 'teacher' or 'student')")
    if not pairs and (names or not singles):  # names alone, or nothing: the cached pair
        pairs = [checkpoint_dir(args.preset)]
    wanted = names or ["teacher", "student"]
    models = {(name if len(pairs) == 1 else f"{pair}/{name}"): pair / name for pair in pairs for name in wanted}
    return {**models, **singles}


def run_eval(models: dict[str, Path], domains, tasks, split: str, limit, batch_size: int, plot: Path | None) -> dict:
    from cdcca.data.digits_shift import load_domain
    from cdcca.evaluate import evaluate, summarize
    from cdcca.models.checkpoint import load_mllm
    from cdcca.report import format_table, plot_domain_accuracy

    samples = [s for domain in domains for s in load_domain(domain, split, limit=limit, tasks=tuple(tasks))]
    scores = {
        name: evaluate(load_mllm(path), samples, batch_size, desc=f"eval {name}") for name, path in models.items()
    }
    columns = ["domain", "vqa", "mc", "accuracy", "bleu4", "cider", "samples"]
    for name, rows in scores.items():
        print(format_table([r.to_dict() for r in rows], columns, title=f"\n{name} ({models[name]}), split={split}"))
    summary = summarize(scores)
    side_by_side = [
        {"domain": d, **{name: next(r.accuracy for r in rows if r.domain == d) for name, rows in scores.items()}}
        for d in domains
    ]
    print(format_table(side_by_side, ["domain", *scores], title="\naccuracy (%) side by side"))
    for key in ("teacher_minus_student_on_targets", "student_source_minus_targets"):
        if key in summary:
            print(f"{key}: {summary[key]:+.1f} points")
    report = {
        "split": split,
        "limit": limit,
        "models": {n: str(p) for n, p in models.items()},
        "scores": {n: [r.to_dict() for r in rows] for n, rows in scores.items()},
        "summary": summary,
    }
    if plot is not None:
        plot_domain_accuracy(report["scores"], plot, f"digits-shift ({split}): source vs shifted targets")
        print(f"plot: {plot}")
    return report


def cmd_eval(args) -> dict:
    from cdcca.data.sample import TASKS

    return run_eval(
        _resolve_models(args), args.domains, args.tasks or TASKS, args.split, args.limit, args.batch_size, args.plot
    )


def cmd_info(args) -> dict:
    from cdcca.data.digits_shift import corpus
    from cdcca.models.checkpoint import build_pair
    from cdcca.models.presets import get_preset
    from cdcca.models.tokenizer import build_tokenizer
    from cdcca.models.trainable import add_lora, count_parameters
    from cdcca.report import format_table

    preset = get_preset(args.preset)
    teacher, student = build_pair(preset, build_tokenizer(corpus()))
    rows = [
        {"model": name, **count_parameters(add_lora(model))}
        for name, model in (("teacher", teacher), ("student", student))
    ]
    print(
        format_table(
            rows,
            ["model", "total", "vision_encoder", "trainable", "lora", "query_tokens", "norms", "biases"],
            title=f"preset {preset.name}: parameters (trainable set = what DWC transmits)",
        )
    )
    return {"preset": preset.name, "parameters": rows}


def cmd_demo(args) -> dict:
    from cdcca.demo import DemoConfig, plot_demo, run_demo
    from cdcca.paths import cache_dir, checkpoint_dir

    pretrain_report = cmd_pretrain(args)  # a no-op when the checkpoints are already there
    json_path = args.json or cache_dir() / "reports" / f"demo_{args.preset}.json"
    config = DemoConfig(checkpoints=args.out or checkpoint_dir(args.preset), rounds=args.rounds,
                        stream_images=args.stream_images, test_images=args.test_images,
                        workdir=args.workdir or cache_dir() / "demo", port=args.port,
                        threads=args.threads or 2)  # fmt: skip
    report = run_demo(config)
    args.json = json_path
    plot = args.plot or json_path.with_suffix(".png")
    plot_demo(report, plot)
    print(f"plot: {plot}")
    return {"pretrain": pretrain_report, **report}


def _open_link(args, listen: bool):
    """The Zenoh link of ``edge``/``cloud``; any refusal (a bad file, a setting Zenoh rejects) is one line. A client
    whose router is not up yet connects in the background (a robot that boots before the network still answers)."""
    from cdcca.transport import Link, LinkConfig

    where = str(args.link) if args.link else args.endpoint
    try:
        config = LinkConfig.from_file(args.link) if args.link else LinkConfig.loopback(listen, args.endpoint)
        return Link(config, connect_later=True)
    except KeyboardInterrupt:
        raise
    except Exception as err:
        raise _link_error(where, err) from err


def _link_error(where: str, err: Exception) -> CdccaError:
    """A refused link as one line a user can act on (Zenoh's Rust source paths and Debug text taken out)."""
    from cdcca.transport import without_rust_paths

    message = without_rust_paths(one_line(err))  # Zenoh's Rust source paths help no user
    rust = re.search(r'msg: "((?:[^"\\]|\\.)*)"', message)  # the readable part of a Rust error's Debug text
    if rust:
        message = "invalid Zenoh setting: " + rust.group(1).replace('\\"', '"') + "; check endpoints and certificates"
    for prefix in ("cannot read link configuration ", f"{where}: "):
        message = message.removeprefix(prefix)
    return CdccaError(f"cannot open the link ({where}): {message}")


def _setup_logging(verbose: bool = False) -> None:
    import logging

    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger().setLevel(level)


def _writable_dir(path: Path, flag: str) -> Path:
    """Create ``path`` (a folder the verb writes to) now, so a bad one fails before any model loads."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CdccaError(f"cannot create the {flag} folder {path}: {err.strerror or err}; pass a writable folder "
                         f"with {flag}") from err  # fmt: skip
    if not os.access(path, os.W_OK | os.X_OK):
        raise CdccaError(f"the {flag} folder {path} is not writable; pass a writable folder with {flag}")
    return path


def _check_output_dir(path: Path, flag: str) -> None:
    """A folder a verb will create or fill must be creatable and writable before a long run starts."""
    if path.exists() and not path.is_dir():
        raise CdccaError(f"{flag} {path} is a file, not a folder; pass a folder with {flag}")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CdccaError(f"cannot write {flag} {path}: {existing} is not a writable folder; pass another path with "
                         f"{flag}")  # fmt: skip


PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "webp", "tif", "tiff", "eps", "ps")  # what matplotlib writes


def _check_output_file(path: Path, flag: str) -> None:
    """A report or plot file's folder must be writable before a long run starts, not after it."""
    example = "plot.png" if flag == "--plot" else "report.json"
    if path.is_dir():
        raise CdccaError(f"{flag} {path} is a folder; pass a file name such as {path / example}")
    if flag == "--plot" and path.suffix.lower().lstrip(".") not in PLOT_FORMATS:
        raise CdccaError(f"--plot {path}: the picture's format comes from its extension, one of "
                         f"{', '.join('.' + f for f in PLOT_FORMATS)}; pass e.g. {path.with_suffix('.png')}")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise CdccaError(f"{flag} {path} is not writable; pass another file with {flag}")
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CdccaError(f"cannot write {flag} {path}: {parent} is not a writable folder; pass another path with "
                         f"{flag}")  # fmt: skip


SOURCE_FORMS = "bag:PATH[#CAMERA_TOPIC], dir:PATH, realsense, realsense:FILE or ros:CAMERA_TOPIC"


def _check_source(spec: str) -> None:
    """``--source`` named well and pointing at something that exists, before the student loads."""
    kind, _, rest = spec.partition(":")
    if kind not in ("bag", "dir", "realsense", "ros") or (kind != "realsense" and not rest):
        raise CdccaError(f"--source {spec!r} is not a source; use {SOURCE_FORMS}")
    if kind == "realsense" and not rest:  # a live camera: there before the student loads, not 23 s later
        from cdcca.edge.sources import require_camera

        require_camera()
    path = Path(rest.partition("#")[0] if kind == "bag" else rest).expanduser()
    if kind in ("bag", "dir") or (kind == "realsense" and rest):
        if not path.exists():
            raise CdccaError(f"--source {spec!r}: {path} does not exist")
        if not os.access(path, os.R_OK):
            raise CdccaError(f"--source {spec!r}: {path} is not readable")


def _edge_prompts(args) -> tuple[str, ...] | None:
    """``--prompt`` values then the lines of ``--prompts-file``; ``None`` when neither was given."""
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        try:
            lines = Path(args.prompts_file).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise CdccaError(f"--prompts-file {args.prompts_file}: cannot read it ({one_line(err)})") from err
        prompts += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if len(prompts) == len(args.prompt or []):
            raise CdccaError(f"--prompts-file {args.prompts_file} holds no prompt (one per line)")
    return tuple(prompts) or None


def _edge_source(args) -> str:
    """``--source``, with ``--topic`` folded in as ``bag:PATH#TOPIC``."""
    if args.topic is None:
        return args.source
    if not args.source.startswith("bag:") or "#" in args.source:
        raise CdccaError(f"--topic goes with --source bag:PATH (without #TOPIC), got --source {args.source!r}")
    return f"{args.source}#{args.topic}"


def cmd_edge(args) -> dict:
    from cdcca.edge.app import ReplaySettings, build_runtime, edge_exit_code, edge_exit_reason, replay, stop_on_signals
    from cdcca.edge.runtime import EdgeConfig
    from cdcca.edge.sources import DEFAULT_PROMPTS
    from cdcca.envelope import TrustStore
    from cdcca.paths import cache_dir

    _setup_logging(args.verbose)
    args.source = _edge_source(args)
    _check_source(args.source)
    prompts = _edge_prompts(args) or DEFAULT_PROMPTS
    state = _writable_dir(args.state or cache_dir() / "edge" / args.robot_id, "--state")
    trust = args.trust or cache_dir() / "trust"
    if not TrustStore.load(trust).keys:  # a missing or malformed store fails now, with advice, before the model loads
        logging.getLogger("cdcca.edge").warning(
            "the trust store %s trusts no key: every update from the cloud will be rejected until `cdcca keys trust "
            "PUBFILE --store %s` adds one (the robot reads the store again for each update)", trust, trust)
    config = EdgeConfig(robot_id=args.robot_id, state_dir=state, queue_capacity=args.queue_capacity,
                        cloud_warn_after_s=args.cloud_warn_after)  # fmt: skip
    settings = ReplaySettings(args.source, tuple(prompts), args.batch_size,
                              args.query_rate, args.rate, args.linger, show_answers=args.show_answers,
                              answers_file=args.answers_file, metrics_port=args.metrics_port,
                              metrics_addr=args.metrics_addr, status_line=args.status_line,
                              wait_updates=args.wait_updates)  # fmt: skip
    link = _open_link(args, listen=False)
    try:
        runtime = build_runtime(_pair_folder(args), config, trust, link, backend=args.backend, threads=args.threads)
    except BaseException:  # Ctrl-C while the model loads included: KeyboardInterrupt, "interrupted"
        link.close()
        raise
    stop = threading.Event()
    try:
        stop_on_signals(stop)  # from here on Ctrl-C stops the replay cleanly (the queue and adapter state are durable)
        report = replay(runtime, settings, stop)
    finally:
        runtime.stop()  # the loop ends, then the link (no ack arrives after it), then the queue
        try:
            link.close()
        finally:
            runtime.close()
    print(format_stats(report, f"robot {args.robot_id}"))
    print(
        f"robot {args.robot_id}: {report['queries']} queries, {report['answers']} answers, "
        f"{report['uplink_enqueued']} samples queued for the cloud, {report['uplink_acked']} acknowledged, "
        f"{report['uplink_queued']} still queued, adapter v{report['adapter_version']} "
        f"({report['seconds']:.1f} s)"
    )
    if report["queries"] == 0 and not stop.is_set() and args.source.startswith(("dir:", "bag:")):
        skipped = sum(report.get("faults", {}).values()) if isinstance(report.get("faults"), dict) else 0
        raise CdccaError(f"--source {args.source}: not one frame could be read ({skipped} skipped, the log says why); "
                         "point it at a folder of PNG/JPEG frames or a bag with a camera topic")  # fmt: skip
    reason = edge_exit_reason(report)
    if reason is not None:  # answers were made, but the cloud side of the loop was not: exit 3 says so
        print(f"cdcca edge: warning: {reason}", file=sys.stderr)
        report["exit_code"] = edge_exit_code(report)
    return report


def cmd_cloud(args) -> dict:
    from cdcca.akd import AKDConfig
    from cdcca.dwc import get_codec
    from cdcca.edge.app import stop_on_signals
    from cdcca.envelope import Signer
    from cdcca.paths import cache_dir
    from cloud_trainer.app import build_trainer, serve
    from cloud_trainer.distributed import follow, init_from_env, send_stop
    from cloud_trainer.service import CloudConfig

    _setup_logging(args.verbose)
    get_codec(args.codec)  # an unknown codec fails now, not after the first round
    if args.max_round_samples < args.round_size:
        raise CdccaError(f"--round-size {args.round_size} is more than --max-round-samples {args.max_round_samples}: "
                         "a round could never start; raise --max-round-samples or lower --round-size")  # fmt: skip
    rank, world = init_from_env()
    state = _writable_dir(args.state or cache_dir() / "cloud", "--state")
    config = CloudConfig(state_dir=state, store=args.store, round_size=args.round_size,
                         max_round_samples=args.max_round_samples, replay=args.replay, codec=args.codec,
                         flush_after_s=args.flush_after,
                         akd=AKDConfig(steps=args.steps, lr=args.lr, seed=args.seed,
                                       pseudo_label_keep=args.pseudo_label_keep,
                                       check_fraction=args.check_fraction, check_min=args.check_min),
                         metrics_port=args.metrics_port, metrics_address=args.metrics_address,
                         status_every_s=args.status_every, comeback_after_s=args.comeback_after,
                         adapter_cache=args.adapter_cache, worker_id=args.worker_id, lease_s=args.lease)  # fmt: skip
    key = args.key or cache_dir() / "keys" / "cloud-1.key"
    Signer.load(key)  # a missing key fails now, with advice, before the teacher loads
    if rank > 0:  # torchrun: rank 0 serves; this rank distills alongside it
        trainer = build_trainer(_pair_folder(args), key, config, hold_state=False)  # rank 0 holds the folder
        return {"rank": rank, "rounds": follow(trainer)}
    if args.dds:
        from cdcca.transport.dds import DdsLink

        link = DdsLink()
    else:
        link = _open_link(args, listen=True)
    try:
        trainer = build_trainer(_pair_folder(args), key, config, link)
    except BaseException:  # Ctrl-C while the teacher loads included
        link.close()
        raise
    stop = threading.Event()
    try:
        stop_on_signals(stop)  # inside: a failure here still closes the trainer (and lets its --state go)
        report = serve(trainer, stop)
    finally:
        if world > 1:
            send_stop()
        try:
            link.close()  # no upload or status arrives after it, so none meets a closed store
        finally:
            trainer.close()
    print(format_stats(report, "cloud trainer"))
    return report


def format_stats(report: dict, title: str) -> str:
    from cdcca.report import format_table

    rows = [{"counter": k, "value": v} for k, v in report.items()]
    return format_table(rows, ["counter", "value"], title=title)


def cmd_export(args) -> dict:
    from cdcca.edge.onnx_export import cli_export

    args.checkpoints = _pair_folder(args)
    return cli_export(args)


def cmd_make_bag(args) -> dict:
    from cdcca.bag import make_stream_bag
    from cdcca.report import format_table

    summary = make_stream_bag(args.path, domains=tuple(args.domains), split=args.split, limit=args.limit,
                              storage=args.storage)  # fmt: skip
    rows = [{"topic": topic, "messages": count} for topic, count in summary.counts.items()]
    print(format_table(rows, ["topic", "messages"], title=f"{summary.storage} bag -> {summary.path}"))
    return {"path": str(summary.path), "storage": summary.storage, "counts": summary.counts}


def _trust(public_file: Path, store_dir: Path, replace: bool) -> Path:
    """``keys trust``: a different key under an already trusted id is refused in one line naming both
    fingerprints, unless ``--replace`` asks for exactly that; revoked keys stay refused either way."""
    from cdcca.envelope import KeyStoreError, TrustStore, fingerprint, trust_key

    try:
        new_hex = public_file.read_text()
    except OSError as err:
        raise KeyStoreError(f"cannot read the public key {public_file}: {err.strerror or err}") from err
    key_id, new = public_file.stem, fingerprint(new_hex) if _is_hex(new_hex) else None
    store = TrustStore.load(store_dir) if store_dir.is_dir() else TrustStore()
    old = store.fingerprints().get(key_id)
    if old is None or new is None or old == new:
        return trust_key(public_file, store_dir)  # validates the key, refuses revoked ones
    if not replace:
        raise KeyStoreError(f"a different key is already trusted as {key_id!r} (trusted {old}, new {new}); "
                            "pass --replace to replace it, or trust the new key under a new id")  # fmt: skip
    del store.keys[key_id]
    store.add(key_id, new_hex)  # the new key must be valid and not revoked
    target = store_dir / f"{key_id}.pub"
    write_atomic(target, new_hex)
    return target


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text.strip())
    except ValueError:
        return False
    return True


def cmd_keys(args) -> dict:
    from cdcca.envelope import KeyStatement, KeyStoreError, Signer, TrustStore, fingerprint, generate_key
    from cdcca.paths import cache_dir
    from cdcca.report import format_table

    store_dir = args.store or cache_dir() / "trust"
    if args.action == "generate":
        private, public = generate_key(args.dir or cache_dir() / "keys", args.key_id)
        print(f"private key (keep in the cloud): {private}\npublic key (give to robots):   {public}\n"
              f"fingerprint: {fingerprint(public.read_text())}")  # fmt: skip
        return {"private": str(private), "public": str(public), "fingerprint": fingerprint(public.read_text())}
    if args.action == "trust":
        stored = _trust(Path(args.target), store_dir, args.replace)
        print(f"trusted {stored.stem} ({fingerprint(stored.read_text())}) in {store_dir}")
        if args.replace:
            print("robots running now keep the key they loaded until they restart")
        return {"trusted": stored.stem, "fingerprint": fingerprint(stored.read_text()), "store": str(store_dir)}
    if args.action in ("endorse", "revoke") and args.key is not None:
        signer = Signer.load(args.key)
        if args.action == "endorse":
            public = Path(args.target)
            statement = KeyStatement.sign(signer, "trust", public.stem, public.read_text(), time.time())
        else:
            statement = KeyStatement.sign(signer, "revoke", args.target, issued_unix=time.time())
        out = args.out or cache_dir() / "keys" / f"{statement.key_id}.{statement.action}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(statement.to_json())
        print(f"{signer.key_id} signed '{statement.action} {statement.key_id}': {out}\n"
              f"on each robot: cdcca keys accept {out} --store TRUST_DIR")  # fmt: skip
        return {"statement": str(out), "action": statement.action, "key_id": statement.key_id,
                "signer": signer.key_id}  # fmt: skip
    if args.action == "endorse":
        raise ValueError("`cdcca keys endorse` needs --key: the trusted key that vouches for the new one")
    store = TrustStore.load(store_dir)
    if args.action == "revoke":
        revoked = store.revoke(args.target)
        print(f"revoked {args.target} ({revoked}) in {store_dir}")
        return {"revoked": args.target, "fingerprint": revoked, "store": str(store_dir)}
    if args.action == "accept":
        try:
            statement = KeyStatement.from_json(Path(args.target).read_text())
        except OSError as err:
            raise KeyStoreError(f"cannot read the statement: {err}") from err
        store.accept(statement)
        print(f"accepted '{statement.action} {statement.key_id}' signed by {statement.signer} into {store_dir}")
        return {"accepted": statement.action, "key_id": statement.key_id, "signer": statement.signer,
                "store": str(store_dir)}  # fmt: skip
    rows = [{"key_id": key_id, "state": state, "fingerprint": value}
            for state, keys in (("trusted", store.fingerprints()), ("revoked", store.revoked))
            for key_id, value in keys.items()]  # fmt: skip
    print(format_table(rows, ["key_id", "state", "fingerprint"], title=f"signing keys in {store_dir}"))
    return {"store": str(store_dir), "keys": list(store.keys), "fingerprints": store.fingerprints(),
            "revoked": dict(store.revoked)}  # fmt: skip


def _print_adapt_tables(report: dict) -> None:
    from statistics import fmean

    from cdcca.report import format_table

    def cell(stats: dict) -> str:
        return f"{stats['mean']:.1f} ± {stats['std']:.1f}"

    gap = report["summary"]["teacher_acc"] - report["summary"]["source_only_acc"]
    rows = [{"method": name, "MC": cell(row["mc"]), "DA": cell(row["da"]), "gain MC": report["gain"][name]["mc"],
             "gain DA": report["gain"][name]["da"], "BLEU-4": row["bleu4"]["mean"], "CIDEr": row["cider"]["mean"],
             "gap closed": report["gain"][name]["acc"] / max(1e-9, gap),
             "source drop": cell(row["source_drop"])} for name, row in report["headline"].items()]  # fmt: skip
    print(
        format_table(
            rows, list(rows[0]), title=f"continual stream, mean over rounds (seeds {report['summary']['seeds']})"
        )
    )
    per_domain = report["per_domain"]
    rows = []
    for domain, table in per_domain.items():
        for name in report["headline"]:
            cell_row = table[name]
            rows.append({"domain": domain, "method": name, "acc": f"{cell_row['acc']:.1f} ± {cell_row['std']:.1f}",
                         "gain": cell_row["gain"], "gap closed": cell_row["gap_closed"],
                         "worst seed": cell_row["gap_closed_worst_seed"], "teacher": table["teacher_acc"]})  # fmt: skip
    print(format_table(rows, list(rows[0]), title="per target domain (accuracy after its round, over seeds)"))
    summary = report["summary"]
    print(
        f"CD-CCA: mean of per-domain gap closed {summary['mean_gap_closed']:.2f} "
        f"(pooled {summary['gap_closed']:.2f}); source drop {summary['source_drop']:.1f} on average, "
        f"{summary['worst_seed_source_drop']:.1f} on the worst seed"
    )
    margins = summary.get("per_domain_margin") or {}  # absent in reports from before stop 42
    if margins:
        rows = [{"domain": domain, "best baseline": m["best_baseline"], "CD-CCA minus it": m["margin"],
                 "seed spread": m["spread"], "closest beyond its spread": m.get("closest_baseline", "-"),
                 "ahead of every one beyond spread": "yes" if m["beyond_spread"] else "no"}
                for domain, m in margins.items()]  # fmt: skip
        print(format_table(rows, list(rows[0]), title="CD-CCA against the baselines per visual domain (points)"))
    if report["ablation"]:
        rows = [{"variant": r["method"], "MC": r["mean"]["mc"], "DA": r["mean"]["da"], "acc": r["mean"]["acc"],
                 "uploaded per round": fmean(x["samples_used"] for x in r["rounds"]),
                 "uplink MB": r["uplink_bytes"] / 1e6,
                 "source drop": r["source_before"] - r["source_after"]} for r in report["ablation"]]  # fmt: skip
        print(format_table(rows, list(rows[0]), title="ablation (Table 3) and token keep ratios (Table 4), first seed"))
        for ratio, delta in (summary.get("uts_minus_random") or {}).items():
            print(f"UTS's tokens minus random tokens at {float(ratio):.0%} kept (same bytes), visual domains: "
                  f"{delta:+.2f} points")


def cmd_bench(args) -> dict:
    from cdcca.report import format_table

    if args.which == "edge":
        from cdcca.benchmarks.edge import cli_bench_edge

        return cli_bench_edge(args)
    if args.which == "fleet":
        from cdcca.benchmarks.fleet import cli_bench_fleet

        return cli_bench_fleet(args)
    shifts = {}
    if args.which == "adapt" and args.shifts:  # the user's file runs before seconds of model loading, not after
        from cdcca.data.digits_shift import load_shifts

        shifts = {"shifts": args.shifts, "domains": load_shifts(args.shifts)}
    checkpoints = _pair_folder(args)
    plot = args.plot or (args.json.with_suffix(".png") if args.json else None)
    if args.which == "uplink":
        from cdcca.benchmarks.uplink import UplinkBenchConfig, plot_uplink, run_uplink_bench
        from cdcca.models.checkpoint import load_mllm  # seconds of imports: after the cheap checks

        student = load_mllm(checkpoints / "student")
        report = run_uplink_bench(student, UplinkBenchConfig(images_per_domain=args.images_per_domain))
        print(format_table(report["rows"], ["policy", "bytes_per_frame", "vs_raw_%", "native_24px"],
                           title=f"uplink per frame, camera {report['config']['camera']}"))  # fmt: skip
        plotter = plot_uplink
    elif args.which == "adapt":
        from cdcca.benchmarks.adapt import AdaptBenchConfig, plot_adapt, run_adapt_bench

        methods = AdaptBenchConfig.methods
        if args.methods:
            methods = ("source-only", *[m for m in args.methods if m not in ("source-only", "cdcca")], "cdcca")
        config = AdaptBenchConfig(
            seeds=tuple(args.seeds),
            stream_images=args.stream_images,
            methods=methods,
            **shifts,
            steps=args.steps or AdaptBenchConfig.steps,
            ablations=not args.no_ablations,
            workers=args.workers or args.threads or 1,
            threads=args.threads,
        )
        report = run_adapt_bench(checkpoints, config)
        _print_adapt_tables(report)
        plotter = plot_adapt
    else:
        from cdcca.benchmarks.downlink import DownlinkBenchConfig, plot_downlink, run_downlink_bench
        from cdcca.models.checkpoint import load_mllm

        student, teacher = load_mllm(checkpoints / "student"), load_mllm(checkpoints / "teacher")
        report = run_downlink_bench(student, teacher, DownlinkBenchConfig(steps=args.steps or 150))
        _print_downlink_tables(report)
        plotter = plot_downlink
    for key, value in report["summary"].items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    if plot is not None:
        plotter(report, plot)
        print(f"plot: {plot}")
    return report


def _print_downlink_tables(report: dict) -> None:
    from cdcca.report import format_table

    columns = ["codec", "params", "bytes", "bits_per_param", "ms_at_1gbps", "ms_at_10mbps", "encode_ms",
               "decode_ms", "accuracy", "acc_loss_points"]  # fmt: skip
    print(format_table(report["codecs"], columns, title=f"DWC codecs, domain {report['config']['domain']}"))
    aware = [(case, row) for case in report["cases"] for row in case["codecs"] if row.get("draws")]
    if aware:  # a codec-aware codec: its loss per case and basis draw
        rows = [{"codec": row["codec"], "domain": case["domain"], "seed": case["seed"],
                 "mean_loss": row["acc_loss_points"],
                 "per_draw": " / ".join(f"{d['acc_loss_points']:.2f}" for d in row["draws"])} for case, row in aware]
        print(format_table(rows, list(rows[0]), title="codec-aware rounds: accuracy loss per case, each basis draw"))
    swap = report["hot_swap"]
    print(format_table([swap], list(swap), title="hot-swap"))


def cmd_status(args) -> dict:
    from cdcca.status import run_status
    from cdcca.transport import LinkConfig, LinkError

    _setup_logging(args.verbose)
    config = LinkConfig.from_file(args.link) if args.link else LinkConfig.loopback(False, args.endpoint)
    try:
        snapshot = run_status(config, once_after_s=args.once, json_out=args.as_json)
    except LinkError as err:  # the session could not open: one line, as edge and cloud say it
        raise _link_error(str(args.link) if args.link else args.endpoint, err) from err
    if args.once is not None and not snapshot["robots"] and snapshot["cloud"] is None and not snapshot["cloud_present"]:
        # a health check reads the exit code: nothing heard is not "all well"
        short = " (robots report every 2 s: listen longer than that)" if args.once < 2.5 else ""
        print(f"cdcca status: warning: nothing heard in {args.once:g} s: no robot and no cloud on this link{short}",
              file=sys.stderr)  # fmt: skip
        return {**snapshot, "exit_code": 3}
    return snapshot


# ---------------------------------------------------------------------------------------------------- main
HANDLERS = {"pretrain": cmd_pretrain, "eval": cmd_eval, "info": cmd_info, "demo": cmd_demo, "bench": cmd_bench,
            "make-bag": cmd_make_bag, "keys": cmd_keys, "edge": cmd_edge, "cloud": cmd_cloud,
            "export": cmd_export, "status": cmd_status}  # fmt: skip


def one_line(err: BaseException) -> str:
    """An exception's message on one line (multi-line messages joined with '; ')."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def describe_os_error(err: OSError) -> str:
    """A file-system failure as what happened to which path and what to do."""
    path = err.filename if err.filename is not None else "a file"
    reason = err.strerror or one_line(err)
    if err.errno == errno.ENOSPC:
        return f"no space left on the device writing {path}; free some space or write elsewhere"
    if err.errno in (errno.EACCES, errno.EPERM) and err.filename is not None and os.path.exists(err.filename) \
            and not os.access(err.filename, os.R_OK):  # fmt: skip
        if not os.access(err.filename, os.W_OK):  # which of the two failed, the error does not say
            return f"cannot read or write {path}: {reason}; check its owner and permissions"
        return f"cannot read {path}: {reason}; check its permissions"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: {reason}; pass a writable path"
    if err.errno == errno.ENOENT:
        return f"no such file or folder: {path}"
    if err.errno == errno.ENOTDIR:
        return f"{path}: a part of this path is a file, not a folder; pass another path"
    return f"{path}: {reason}"


def quiet_third_party(verbose: bool) -> None:
    """Silence library warnings (torch, transformers ...: internal paths a user cannot act on) unless ``verbose``."""
    import logging
    import warnings

    if verbose:
        return
    warnings.filterwarnings("ignore", module=THIRD_PARTY_WARNINGS)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("transformers", "torch", "peft", "bitsandbytes", "onnxruntime", "zenoh"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # its own verbosity setting wins over the logger's level
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


OUTPUT_DIRS = {"pretrain": ("out",), "demo": ("out", "workdir"), "export": ("out",), "make-bag": ("path",),
               "keys": ("dir",)}  # fmt: skip


def _pair_folder(args) -> Path:
    """The teacher/student pair's folder: ``--model DIR``, checked where a verb is about to load it (a missing
    relative folder was taken for a model hub id), or the preset's in the cache."""
    from cdcca.paths import checkpoint_dir

    if args.checkpoints is None:
        return checkpoint_dir(args.preset)
    folder = Path(args.checkpoints)
    if not folder.exists():
        raise CdccaError(f"--model {folder}: no such folder; pass the folder `cdcca pretrain --out` wrote (it holds "
                         "teacher/ and student/), or run `cdcca pretrain` to build the embedded pair")  # fmt: skip
    if not folder.is_dir():
        raise CdccaError(f"--model {folder} is a file; pass the folder that holds teacher/ and student/")
    if (folder / "config.json").is_file() and not (folder / "student").exists():
        raise CdccaError(f"--model {folder} is one model's folder; pass the folder above it ({folder.parent}), "
                         "which holds teacher/ and student/")  # fmt: skip
    return folder


def _preflight(args) -> None:
    """Checks that cost nothing and would otherwise fail after a long run: where reports, plots and models go."""
    for flag in ("json", "plot") + (("out",) if args.verb == "keys" else ()):
        path = getattr(args, flag, None)
        if path is not None:
            _check_output_file(Path(path), f"--{flag}")
    for flag in OUTPUT_DIRS.get(args.verb, ()):
        path = getattr(args, flag, None)
        if path is not None:
            _check_output_dir(Path(path), "PATH" if flag == "path" else f"--{flag}")


class _CtrlC:
    """A Ctrl-C that Python dropped while :func:`main` ran. Python drops an exception raised inside a weakref callback
    or ``__del__`` ("Exception ignored in ..."), and importlib runs such a callback for its module locks, so a Ctrl-C
    that landed there while a verb imported torch was lost and the verb ran on to exit 0. An unraisable hook notes
    such a KeyboardInterrupt (``dropped``, unprinted) when the handler (Python's own, plus a flag) raised it, and
    ``main`` ends the verb as interrupted once it returns; one the verb caught itself (``cdcca status`` stops so),
    also after a dropped one, is not dropped. The verb still runs on to its end or the next Ctrl-C after a drop.
    Installed only where Python's default handler is (the main thread, no handler of the caller's); a verb's own
    handler (``cdcca edge``, ``cdcca cloud``) takes over while it runs and stays after it if the verb left it."""

    def __init__(self) -> None:
        self.pressed = self.dropped = False
        self._active = (threading.current_thread() is threading.main_thread()
                        and signal.getsignal(signal.SIGINT) is signal.default_int_handler)  # fmt: skip
        self._hook = sys.unraisablehook

    def __enter__(self) -> _CtrlC:
        if self._active:
            signal.signal(signal.SIGINT, self._on_sigint)
            sys.unraisablehook = self._unraisable
        return self

    def __exit__(self, *exc) -> None:
        if self._active:
            if signal.getsignal(signal.SIGINT) == self._on_sigint:  # a verb's own handler stays (cloud's)
                signal.signal(signal.SIGINT, signal.default_int_handler)
            sys.unraisablehook = self._hook

    def _on_sigint(self, signum, frame) -> None:
        self.pressed, self.dropped = True, False  # a press that is raised replaces one Python dropped before it
        raise KeyboardInterrupt

    def _unraisable(self, unraisable) -> None:
        if self.pressed and isinstance(unraisable.exc_value, KeyboardInterrupt):  # ours: main reports it, once
            self.dropped = True
        else:
            self._hook(unraisable)


def main(argv: list[str] | None = None) -> int:
    """Run one verb; returns the exit code (0 ok, 1 unexpected failure, 2 user error, 130 interrupted)."""
    with _CtrlC() as ctrl_c:
        return _main(argv, ctrl_c)


def _main(argv: list[str] | None, ctrl_c: _CtrlC) -> int:
    prog, verbose = "cdcca", False
    try:
        args = build_parser().parse_args(argv)
        action = getattr(args, "action", None) or getattr(args, "which", None)  # keys and bench actions
        prog, verbose = " ".join(filter(None, ("cdcca", args.verb, action))), args.verbose
        quiet_third_party(verbose)
        if verbose:
            _setup_logging(verbose=True)
        _preflight(args)
        if args.threads and not (args.verb == "edge" and args.backend == "onnx"):  # ORT takes threads itself
            import torch

            torch.set_num_threads(args.threads)
        started = time.perf_counter()
        report = HANDLERS[args.verb](args)
        if ctrl_c.dropped:  # a Ctrl-C Python dropped on the way (see _CtrlC): the verb still ends as interrupted
            raise KeyboardInterrupt
        if args.json is not None:
            from cdcca.report import environment, write_json

            if args.verb in MEASURING_VERBS and isinstance(report, dict) and "environment" not in report:
                # what the figures were measured with, and how long the verb took (targets such as `bench adapt`'s
                # 15 minutes are read from it)
                report = {**report, "environment": environment(), "wall_s": round(time.perf_counter() - started, 1)}

            try:
                print(f"report: {write_json(report, args.json)}")
            except OSError as err:  # a full disk fails at close, where the error carries no file name
                err.filename = err.filename or str(args.json)
                raise
        return int(report.get("exit_code", 0)) if isinstance(report, dict) else 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (CdccaError, ValueError, OSError) as err:  # what the user can fix: one line, exit 2
        if verbose:
            import traceback

            traceback.print_exc()
        plain_os_error = isinstance(err, OSError) and not isinstance(err, CdccaError)
        print(f"{prog}: error: {describe_os_error(err) if plain_os_error else one_line(err)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # a robot-only install asked for what only the cloud install has
        top = (err.name or "").split(".")[0]
        if top in EDGE_EXTRA_MODULES and not prog.startswith("cdcca cloud"):  # `cloud --dds`: [cloud] has it
            print(f"{prog}: error: {EDGE_EXTRA_MODULES[top]} needs {top}, which is missing: pip install "
                  "'cdcca[edge]' (pyrealsense2 also needs Debian's libusb-1.0-0)", file=sys.stderr)  # fmt: skip
            return 2
        if top not in CLOUD_ONLY_MODULES:
            print(f"{prog}: error: unexpected ModuleNotFoundError: {one_line(err)} (run with --verbose for the "
                  "traceback)", file=sys.stderr)  # fmt: skip
            return 1
        print(f"{prog}: error: this needs the cloud install ({top} is missing): pip install 'cdcca[cloud]'; a robot "
              "without torch runs `cdcca edge --backend onnx` on an exported student", file=sys.stderr)  # fmt: skip
        return 2
    except Exception as err:  # a bug: say so in one line; the traceback is a flag away
        if verbose:
            import traceback

            traceback.print_exc()
        if type(err).__module__ == "sqlite3":  # a state database the disk or permissions refuse
            print(f"{prog}: error: the state database failed: {one_line(err)}; check that the --state folder (and "
                  "the --store file, if given) is writable and its disk has room", file=sys.stderr)  # fmt: skip
            return 2
        print(f"{prog}: error: unexpected {type(err).__name__}: {one_line(err)} (run with --verbose for the "
              "traceback)", file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
