"""``cdcca``: the command line. Each verb prints a human table and can write a JSON report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from cdcca.errors import CdccaError

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
    "bench": "benchmarks: `bench uplink` (UTS), `bench downlink` (DWC, hot-swap), `bench adapt` (Tables 1-4), "
    "`bench edge` (torch vs ONNX Runtime)",
}


def _add_pretrain_args(parser: argparse.ArgumentParser) -> None:
    from cdcca.pretrain import PretrainConfig

    defaults = PretrainConfig.__dataclass_fields__
    parser.add_argument("--preset", default="tiny", help="model preset: tiny (default) or test")
    parser.add_argument("--vision-steps", type=int, default=defaults["vision_steps"].default)
    parser.add_argument("--teacher-steps", type=int, default=defaults["teacher_steps"].default)
    parser.add_argument("--student-steps", type=int, default=defaults["student_steps"].default)
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"].default)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="checkpoint directory (default: the cache)")


def _add_eval_args(parser: argparse.ArgumentParser) -> None:
    from cdcca.data.digits_shift import DOMAINS
    from cdcca.data.sample import TASKS

    parser.add_argument("--preset", default="tiny", help="preset whose pretrained pair is evaluated")
    parser.add_argument(
        "--checkpoints",
        type=Path,
        default=None,
        help="directory holding teacher/ and student/ (default: the preset's cache dir)",
    )
    parser.add_argument(
        "--model",
        nargs="+",
        default=["teacher", "student"],
        help="'teacher', 'student' or paths of checkpoint directories",
    )
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--split", default="test", choices=["stream", "test"])
    parser.add_argument("--limit", type=int, default=None, help="images per domain (default: the whole split)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG bar chart of accuracy per domain")


def _add_link_args(parser: argparse.ArgumentParser) -> None:
    from cdcca.transport import DEFAULT_ENDPOINT

    parser.add_argument("--endpoint", default=DEFAULT_ENDPOINT,
                        help=f"loopback/peer endpoint of the cloud (default {DEFAULT_ENDPOINT})")  # fmt: skip
    parser.add_argument("--link", type=Path, default=None,
                        help="JSON link configuration (mode, listen, connect, TLS files, user/password)")  # fmt: skip


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="preset whose pretrained checkpoints are used")
    parser.add_argument("--checkpoints", type=Path, default=None, help="directory holding teacher/ and student/")


def _add_edge_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser)
    _add_link_args(parser)
    parser.add_argument("--robot-id", default="r1")
    parser.add_argument("--source", required=True,
                        help="bag:PATH[#CAMERA_TOPIC], dir:PATH, realsense, realsense:FILE "
                             "or ros:CAMERA_TOPIC (DDS)")  # fmt: skip
    parser.add_argument("--prompt", action="append", default=None,
                        help="prompt asked about every frame of a folder, camera or bag without /cdcca/prompt "
                             "(repeatable)")  # fmt: skip
    parser.add_argument("--state", type=Path, default=None, help="uplink queue + adapter state (default: cache)")
    parser.add_argument("--trust", type=Path, default=None, help="trust store of signing keys (default: cache)")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rate", type=float, default=1.0,
                        help="recordings: replay speed, a multiple of the recorded rate as `ros2 bag play --rate` "
                             "(default 1; 0: as fast as possible)")  # fmt: skip
    parser.add_argument("--query-rate", type=float, default=0.0,
                        help="queries per second at most (default 0: no limit)")  # fmt: skip
    parser.add_argument("--linger", type=float, default=None,
                        help="after the source ends: a recording exits once the cloud acknowledged its uplink, "
                             "waiting at most this many seconds (default 30); other sources keep serving this long "
                             "(default: until Ctrl-C); -1: until Ctrl-C")  # fmt: skip
    parser.add_argument("--queue-capacity", type=int, default=1024)


def _add_cloud_args(parser: argparse.ArgumentParser) -> None:
    from cdcca.akd import AKDConfig
    from cloud_trainer.service import CloudConfig

    akd, cloud = AKDConfig.__dataclass_fields__, CloudConfig.__dataclass_fields__
    _add_model_args(parser)
    _add_link_args(parser)
    parser.add_argument("--dds", action="store_true",
                        help="join the robots' ROS 2 graph directly over DDS (topics /cdcca/<topic>; ROS_DOMAIN_ID, "
                             "ROS_AUTOMATIC_DISCOVERY_RANGE) instead of Zenoh: a cloud on the robots' LAN")  # fmt: skip
    parser.add_argument("--state", type=Path, default=None, help="SQLite store and round log (default: cache)")
    parser.add_argument("--key", type=Path, default=None, help="Ed25519 signing key (default: cache/keys/cloud-1.key)")
    parser.add_argument("--round-size", type=int, default=cloud["round_size"].default)
    parser.add_argument("--max-round-samples", type=int, default=cloud["max_round_samples"].default)
    parser.add_argument("--replay", type=int, default=cloud["replay"].default,
                        help="samples of earlier rounds trained on again with each round's new ones")  # fmt: skip
    parser.add_argument("--check-fraction", type=float, default=akd["check_fraction"].default,
                        help="share of a round's samples held out; the round keeps the weights that agree best "
                             "with the teacher on them (0: off)")  # fmt: skip
    parser.add_argument("--check-min", type=int, default=akd["check_min"].default,
                        help="fewest held-out samples a check may rest on (smaller rounds go unchecked)")  # fmt: skip
    parser.add_argument("--pseudo-label-keep", type=float, default=akd["pseudo_label_keep"].default,
                        help="fraction of samples, the teacher's most confident, a round trains on")  # fmt: skip
    parser.add_argument("--flush-after", type=float, default=None,
                        help="seconds after which fewer than --round-size samples still make a round")  # fmt: skip
    parser.add_argument("--codec", default=cloud["codec"].default)
    parser.add_argument("--steps", type=int, default=akd["steps"].default, help="AKD optimizer steps per round")
    parser.add_argument("--lr", type=float, default=akd["lr"].default)
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdcca",
        description="Cloud-device collaborative continual adaptation for multimodal LLMs (CVPR 2024).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="verbs:\n" + "\n".join(f"  {verb:<10} {text}" for verb, text in VERBS.items()),
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, text in VERBS.items():
        p = sub.add_parser(verb, help=text, description=text)
        p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        if verb in ("pretrain", "demo"):
            _add_pretrain_args(p)
        if verb == "edge":
            _add_edge_args(p)
        if verb == "cloud":
            _add_cloud_args(p)
        if verb == "export":
            _add_model_args(p)
            p.add_argument("--backend", default="onnx", choices=["onnx"])
            p.add_argument("--out", type=Path, default=None, help="output directory (default: beside the checkpoints)")
        if verb == "eval":
            _add_eval_args(p)
        if verb == "demo":
            from cdcca.demo import DemoConfig

            demo = DemoConfig.__dataclass_fields__
            p.add_argument("--rounds", type=int, default=demo["rounds"].default, help="adaptation rounds to wait for")
            p.add_argument("--stream-images", type=int, default=demo["stream_images"].default,
                           help="stream images per target domain replayed through the robot")  # fmt: skip
            p.add_argument("--test-images", type=int, default=demo["test_images"].default,
                           help="held-out test images per target domain")  # fmt: skip
            p.add_argument("--workdir", type=Path, default=None, help="state of the run (default: cache/demo)")
            p.add_argument("--port", type=int, default=demo["port"].default, help="loopback port of the cloud")
            p.add_argument("--plot", type=Path, default=None, help="PNG (default: beside the JSON)")
        if verb == "info":
            p.add_argument("--preset", default="tiny")
        if verb == "make-bag":
            from cdcca.data.digits_shift import DOMAINS, TARGET_DOMAINS

            p.add_argument("path", type=Path, help="bag directory to create (must not exist)")
            p.add_argument("--domains", nargs="+", default=list(TARGET_DOMAINS), choices=list(DOMAINS))
            p.add_argument("--split", default="stream", choices=["train", "stream", "test"])
            p.add_argument("--limit", type=int, default=None, help="images per domain (default: the whole split)")
            p.add_argument("--storage", default="mcap", choices=["mcap", "sqlite3"])
        if verb == "keys":
            p.add_argument("action", choices=["generate", "trust", "list", "revoke", "endorse", "accept"],
                           help="generate a key pair; trust a .pub; list the trust store; revoke a key id; endorse: "
                                "sign a statement (with --key) that robots trusting it may trust a new .pub; accept "
                                "such a statement (or a signed revocation) into the trust store")  # fmt: skip
            p.add_argument("target", nargs="?", default=None,
                           help="trust/endorse: the .pub file; revoke: the key id; accept: the statement file")
            p.add_argument("--key-id", default="cloud-1", help="for `generate`: name of the new key")
            p.add_argument("--dir", type=Path, default=None, help="for `generate`: key folder (default: cache/keys)")
            p.add_argument("--store", type=Path, default=None,
                           help="trust store folder (default: cache/trust)")  # fmt: skip
            p.add_argument("--key", type=Path, default=None,
                           help="endorse, revoke: the trusted private key (.key) that signs the statement; `revoke` "
                                "with --key writes a signed revocation instead of revoking locally")  # fmt: skip
            p.add_argument("--out", type=Path, default=None,
                           help="endorse, revoke --key: statement file (default: cache/keys/<id>.<action>.json)")
        if verb == "bench":
            p.add_argument("which", choices=["uplink", "downlink", "adapt", "edge"], help="which benchmark")
            p.add_argument("--preset", default="tiny", help="preset whose pretrained student is measured")
            p.add_argument("--checkpoints", type=Path, default=None, help="directory holding student/")
            p.add_argument("--images-per-domain", type=int, default=80, help="uplink: stream images per domain")
            p.add_argument("--steps", type=int, default=None, help="downlink/adapt: optimizer steps per round")
            p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="adapt: seeds of the headline table")
            p.add_argument("--stream-images", type=int, default=150, help="adapt: stream images per domain")
            p.add_argument("--no-ablations", action="store_true", help="adapt: skip Tables 3 and 4")
            p.add_argument("--methods", nargs="+", default=None,
                           help="adapt: methods of the headline table (default: all; source-only is always run)")
            p.add_argument("--plot", type=Path, default=None, help="PNG (default: beside the JSON)")
    return parser


def cmd_pretrain(args) -> dict:
    from cdcca.pretrain import PretrainConfig, pretrain
    from cdcca.report import format_table

    config = PretrainConfig(
        preset=args.preset,
        vision_steps=args.vision_steps,
        teacher_steps=args.teacher_steps,
        student_steps=args.student_steps,
        batch_size=args.batch_size,
        seed=args.seed,
        out_dir=args.out,
    )
    started = time.perf_counter()
    report = pretrain(config)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(
        format_table(
            report["stages"],
            ["stage", "reused", "steps", "resumed_from", "final_loss"],
            title=f"pretrain {config.preset} -> {config.out_dir}",
        )
    )
    return report


def _resolve_models(args) -> dict[str, Path]:
    from cdcca.paths import checkpoint_dir

    base = args.checkpoints or checkpoint_dir(args.preset)
    return {name: (base / name if name in ("teacher", "student") else Path(name)) for name in args.model}


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
    from cdcca.demo import DemoConfig, run_demo
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
    from cdcca.demo import plot_demo

    plot_demo(report, plot)
    print(f"plot: {plot}")
    return {"pretrain": pretrain_report, **report}


def _link_config(args, listen: bool):
    from cdcca.transport import LinkConfig

    return LinkConfig.from_file(args.link) if args.link else LinkConfig.loopback(listen, args.endpoint)


def _setup_logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def cmd_edge(args) -> dict:
    import threading

    from cdcca.edge.app import ReplaySettings, build_runtime, replay, stop_on_signals
    from cdcca.edge.runtime import EdgeConfig
    from cdcca.edge.sources import DEFAULT_PROMPTS
    from cdcca.paths import cache_dir, checkpoint_dir
    from cdcca.transport import Link

    _setup_logging()
    config = EdgeConfig(robot_id=args.robot_id, state_dir=args.state or cache_dir() / "edge" / args.robot_id,
                        queue_capacity=args.queue_capacity)  # fmt: skip
    stop = threading.Event()
    stop_on_signals(stop)
    link = Link(_link_config(args, listen=False))
    checkpoints, trust = args.checkpoints or checkpoint_dir(args.preset), args.trust or cache_dir() / "trust"
    try:
        runtime = build_runtime(checkpoints, config, trust, link, backend=args.backend, threads=args.threads)
    except BaseException:
        link.close()
        raise
    try:
        settings = ReplaySettings(args.source, tuple(args.prompt or DEFAULT_PROMPTS), args.batch_size,
                                  args.query_rate, args.rate, args.linger)  # fmt: skip
        report = replay(runtime, settings, stop)
    finally:
        runtime.close()
        link.close()
    print(format_stats(report, f"robot {args.robot_id}"))
    print(f"robot {args.robot_id}: {report['queries']} queries, {report['answers']} answers, "
          f"{report['uplink_enqueued']} samples queued for the cloud, {report['uplink_acked']} acknowledged, "
          f"{report['uplink_queued']} still queued, adapter v{report['adapter_version']} "
          f"({report['seconds']:.1f} s)")
    return report


def cmd_cloud(args) -> dict:
    import threading

    from cdcca.akd import AKDConfig
    from cdcca.edge.app import stop_on_signals
    from cdcca.paths import cache_dir, checkpoint_dir
    from cdcca.transport import Link
    from cloud_trainer.app import build_trainer, serve
    from cloud_trainer.distributed import follow, init_from_env, send_stop
    from cloud_trainer.service import CloudConfig

    _setup_logging()
    rank, world = init_from_env()
    config = CloudConfig(state_dir=args.state or cache_dir() / "cloud", round_size=args.round_size,
                         max_round_samples=args.max_round_samples, replay=args.replay, codec=args.codec,
                         flush_after_s=args.flush_after,
                         akd=AKDConfig(steps=args.steps, lr=args.lr, seed=args.seed,
                                       pseudo_label_keep=args.pseudo_label_keep,
                                       check_fraction=args.check_fraction, check_min=args.check_min))  # fmt: skip
    checkpoints, key = args.checkpoints or checkpoint_dir(args.preset), args.key or cache_dir() / "keys" / "cloud-1.key"
    if rank > 0:  # torchrun: rank 0 serves; this rank distills alongside it
        trainer = build_trainer(checkpoints, key, config)
        return {"rank": rank, "rounds": follow(trainer)}
    stop = threading.Event()
    stop_on_signals(stop)
    if args.dds:
        from cdcca.transport.dds import DdsLink

        link = DdsLink()
    else:
        link = Link(_link_config(args, listen=True))
    trainer = build_trainer(checkpoints, key, config, link)
    try:
        report = serve(trainer, stop)
    finally:
        if world > 1:
            send_stop()
        trainer.close()
        link.close()
    print(format_stats(report, "cloud trainer"))
    return report


def format_stats(report: dict, title: str) -> str:
    from cdcca.report import format_table

    rows = [{"counter": k, "value": v} for k, v in report.items()]
    return format_table(rows, ["counter", "value"], title=title)


def cmd_export(args) -> dict:
    from cdcca.edge.onnx_export import cli_export

    return cli_export(args)


def cmd_make_bag(args) -> dict:
    from cdcca.bag import make_stream_bag
    from cdcca.report import format_table

    summary = make_stream_bag(args.path, domains=tuple(args.domains), split=args.split, limit=args.limit,
                              storage=args.storage)  # fmt: skip
    rows = [{"topic": topic, "messages": count} for topic, count in summary.counts.items()]
    print(format_table(rows, ["topic", "messages"], title=f"{summary.storage} bag -> {summary.path}"))
    return {"path": str(summary.path), "storage": summary.storage, "counts": summary.counts}


def cmd_keys(args) -> dict:
    import time

    from cdcca.envelope import KeyStatement, KeyStoreError, Signer, TrustStore, fingerprint, generate_key, trust_key
    from cdcca.paths import cache_dir
    from cdcca.report import format_table

    store_dir = args.store or cache_dir() / "trust"
    needs = {"trust": "the .pub file to add", "endorse": "the new key's .pub file", "revoke": "the key id to revoke",
             "accept": "the statement file"}  # fmt: skip
    if args.action in needs and args.target is None:
        raise ValueError(f"`cdcca keys {args.action}` needs {needs[args.action]}")
    if args.action == "generate":
        private, public = generate_key(args.dir or cache_dir() / "keys", args.key_id)
        print(f"private key (keep in the cloud): {private}\npublic key (give to robots):   {public}\n"
              f"fingerprint: {fingerprint(public.read_text())}")  # fmt: skip
        return {"private": str(private), "public": str(public), "fingerprint": fingerprint(public.read_text())}
    if args.action == "trust":
        stored = trust_key(Path(args.target), store_dir)
        print(f"trusted {stored.stem} ({fingerprint(stored.read_text())}) in {store_dir}")
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
    print(f"CD-CCA: mean of per-domain gap closed {summary['mean_gap_closed']:.2f} "
          f"(pooled {summary['gap_closed']:.2f}); source drop {summary['source_drop']:.1f} on average, "
          f"{summary['worst_seed_source_drop']:.1f} on the worst seed")
    if report["ablation"]:
        rows = [{"variant": r["method"], "MC": r["mean"]["mc"], "DA": r["mean"]["da"], "acc": r["mean"]["acc"],
                 "uploaded per round": float(np.mean([x["samples_used"] for x in r["rounds"]])),
                 "uplink MB": r["uplink_bytes"] / 1e6,
                 "source drop": r["source_before"] - r["source_after"]} for r in report["ablation"]]  # fmt: skip
        print(format_table(rows, list(rows[0]), title="ablation (Table 3) and token keep ratios (Table 4), first seed"))


def cmd_bench(args) -> dict:
    from cdcca.models.checkpoint import load_mllm
    from cdcca.paths import checkpoint_dir
    from cdcca.report import format_table

    if args.which == "edge":
        from cdcca.benchmarks.edge import cli_bench_edge

        return cli_bench_edge(args)
    checkpoints = args.checkpoints or checkpoint_dir(args.preset)
    student = load_mllm(checkpoints / "student")
    plot = args.plot or (args.json.with_suffix(".png") if args.json else None)
    if args.which == "uplink":
        from cdcca.benchmarks.uplink import UplinkBenchConfig, plot_uplink, run_uplink_bench

        report = run_uplink_bench(student, UplinkBenchConfig(images_per_domain=args.images_per_domain))
        print(format_table(report["rows"], ["policy", "bytes_per_frame", "vs_raw_%", "native_24px"],
                           title=f"uplink per frame, camera {report['config']['camera']}"))  # fmt: skip
        plotter = plot_uplink
    elif args.which == "adapt":
        from cdcca.benchmarks.adapt import AdaptBenchConfig, plot_adapt, run_adapt_bench

        methods = AdaptBenchConfig.methods
        if args.methods:
            methods = ("source-only", *[m for m in args.methods if m != "source-only"])
        config = AdaptBenchConfig(seeds=tuple(args.seeds), stream_images=args.stream_images, methods=methods,
                                  steps=args.steps or AdaptBenchConfig.steps, ablations=not args.no_ablations)
        report = run_adapt_bench(checkpoints, config)
        _print_adapt_tables(report)
        plotter = plot_adapt
    else:
        from cdcca.benchmarks.downlink import DownlinkBenchConfig, plot_downlink, run_downlink_bench

        teacher = load_mllm(checkpoints / "teacher")
        report = run_downlink_bench(student, teacher, DownlinkBenchConfig(steps=args.steps or 150))
        columns = ["codec", "params", "bytes", "bits_per_param", "ms_at_1gbps", "ms_at_10mbps", "encode_ms",
                   "decode_ms", "accuracy", "acc_loss_points"]  # fmt: skip
        print(format_table(report["codecs"], columns, title=f"DWC codecs, domain {report['config']['domain']}"))
        swap = report["hot_swap"]
        print(format_table([swap], list(swap), title="hot-swap"))
        plotter = plot_downlink
    for key, value in report["summary"].items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    if plot is not None:
        plotter(report, plot)
        print(f"plot: {plot}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    handler = {
        "pretrain": cmd_pretrain,
        "eval": cmd_eval,
        "info": cmd_info,
        "demo": cmd_demo,
        "bench": cmd_bench,
        "make-bag": cmd_make_bag,
        "keys": cmd_keys,
        "edge": cmd_edge,
        "cloud": cmd_cloud,
        "export": cmd_export,
    }[args.verb]
    try:
        report = handler(args)
    except (CdccaError, ValueError, FileNotFoundError) as err:
        print(f"cdcca {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cdcca {args.verb}: interrupted", file=sys.stderr)
        return 130
    if args.json is not None:
        from cdcca.report import write_json

        print(f"report: {write_json(report, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
