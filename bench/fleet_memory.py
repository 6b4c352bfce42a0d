"""The cloud's memory against the number of robots (issue 16, part 1): one round each, RSS after.

Each robot count runs in a fresh process: a ``CloudTrainer`` on the given checkpoints (``tiny`` by default),
``N`` robots each upload ``round_size`` printed-domain samples and get one round, then the process reports its
resident set (``psutil``), its peak (``resource.getrusage``), the ``MLLM`` objects alive and the bytes of one
robot's adapter state (trainable set + ϕ/ψ) and AdamW moments. Run::

    OMP_NUM_THREADS=1 .venv/bin/python bench/fleet_memory.py --checkpoints ~/.cache/cdcca/checkpoints/tiny --robots 1 8
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def measure(checkpoints: Path, robots: int, round_size: int) -> dict:
    import psutil
    import torch

    from cdcca.akd import AKDConfig
    from cdcca.data.digits_shift import load_domain
    from cdcca.envelope import Signer, generate_key
    from cdcca.models.checkpoint import load_adaptable_student, load_mllm
    from cdcca.models.mllm import MLLM
    from cdcca.uts import pack_tokens
    from cloud_trainer.adapter_states import state_tensors
    from cloud_trainer.service import CloudConfig, CloudTrainer

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="fleet-memory-"))
    signer = Signer.load(generate_key(work / "keys", "fleet")[0])
    config = CloudConfig(state_dir=work / "cloud", round_size=round_size, max_round_samples=round_size,
                         codec="fp16", akd=AKDConfig(steps=2, batch_size=4))  # fmt: skip
    trainer = CloudTrainer(load_mllm(checkpoints / "teacher"), lambda: load_adaptable_student(checkpoints), signer,
                           config)  # fmt: skip
    encoder = load_mllm(checkpoints / "student")
    samples = load_domain("printed", "stream", limit=round_size)[:round_size]  # one image: several tasks
    with torch.inference_mode():
        tokens = encoder.visual_tokens(encoder.preprocess([s.load_image() for s in samples]))  # (B, N, D)
    del encoder
    keep = torch.zeros(tokens.shape[1], dtype=torch.bool)
    keep[::2] = True
    gc.collect()
    before = psutil.Process().memory_info().rss
    for index in range(robots):
        robot_id = f"r{index}"
        for i, sample in enumerate(samples):
            trainer.receive_tokens(robot_id, pack_tokens(
                tokens[i], keep, torch.ones(tokens.shape[1]), robot_id=robot_id, sample_id=sample.sample_id,
                adapter_version=0, prompt=sample.prompt, student_answer="?", sample_entropy=1.0))  # fmt: skip
        trainer.step()
    gc.collect()
    rss = psutil.Process().memory_info().rss
    distiller = trainer.distiller
    state = sum(t.numel() * t.element_size() for t in state_tensors(distiller).values())
    moments = sum(t.numel() * t.element_size() for t in distiller.optimizer_state().values())
    return {"robots": robots, "rounds": trainer.counters.rounds, "rss_bytes": rss, "rss_before_rounds": before,
            "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "mllm_alive": sum(isinstance(o, MLLM) for o in gc.get_objects()),
            "state_bytes": state, "moment_bytes": moments}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, default=Path.home() / ".cache/cdcca/checkpoints/tiny")
    parser.add_argument("--robots", type=int, nargs="+", default=[1, 8], help="robot counts, one process each")
    parser.add_argument("--round-size", type=int, default=8, help="samples per robot (one round each)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child: measure this count only
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.checkpoints, args.one, args.round_size)))
        return
    rows = []
    for robots in args.robots:
        child = [sys.executable, __file__, "--checkpoints", str(args.checkpoints), "--round-size", str(args.round_size),
                 "--one", str(robots)]  # fmt: skip
        out = subprocess.run(child, check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, last = rows[0], rows[-1]
    per_robot = (last["rss_bytes"] - first["rss_bytes"]) / max(1, last["robots"] - first["robots"])
    summary = {"rss_per_added_robot_bytes": per_robot,
               "rss_per_robot_over_state": per_robot / (first["state_bytes"] + first["moment_bytes"])}  # fmt: skip
    print(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
