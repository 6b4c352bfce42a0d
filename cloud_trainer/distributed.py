"""The cloud trainer under ``torchrun --nproc-per-node N``: rank 0 serves, every rank distills.

Rank 0 is the service (link, store, rounds, deltas). Before each round it broadcasts the round's samples
(tokens, masks, prompts: tensors plus a JSON header, no pickle) and every other rank runs the same
:meth:`Distiller.run_round <cdcca.akd.Distiller.run_round>` on them, which averages gradients across ranks
each step (DDP's data parallelism). Ranks start from the same committed state (each rank's one student takes
the robot's adapter state from its memory, else from the shared store directory), so they stay identical.
Backend: ``nccl`` when CUDA is available, else ``gloo``.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from cdcca.akd import DistillSample

STOP, ROUND = 0, 1


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _broadcast_bytes(data: bytes | None) -> bytes:
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    dist.broadcast(size, 0)
    if data is None:
        buffer = torch.zeros(int(size), dtype=torch.uint8)
    else:
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    dist.broadcast(buffer, 0)
    return bytes(buffer.numpy())


def send_round(robot_id: str, samples: list[DistillSample]) -> None:
    """Rank 0: tell the other ranks to run a round of ``robot_id`` on ``samples``."""
    dist.broadcast(torch.tensor([ROUND], dtype=torch.int64), 0)
    header = {"robot_id": robot_id, "ids": [s.sample_id for s in samples], "prompts": [s.prompt for s in samples],
              "messages": [s.message_id for s in samples], "shape": list(samples[0].tokens.shape)}  # fmt: skip
    _broadcast_bytes(json.dumps(header).encode())
    tokens = torch.stack([s.tokens for s in samples]).float().contiguous()
    masks = torch.stack([s.token_mask for s in samples]).long().contiguous()
    dist.broadcast(tokens, 0)
    dist.broadcast(masks, 0)


def send_stop() -> None:
    """Rank 0: release the other ranks."""
    dist.broadcast(torch.tensor([STOP], dtype=torch.int64), 0)


def receive_round() -> tuple[str, list[DistillSample]] | None:
    """Other ranks: the next round (robot id and samples), or ``None`` when rank 0 stops."""
    command = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(command, 0)
    if int(command) == STOP:
        return None
    header = json.loads(_broadcast_bytes(None))
    count, (tokens_n, width) = len(header["ids"]), header["shape"]
    tokens = torch.zeros(count, tokens_n, width)
    masks = torch.zeros(count, tokens_n, dtype=torch.int64)
    dist.broadcast(tokens, 0)
    dist.broadcast(masks, 0)
    samples = [DistillSample(sample_id, tokens[i], masks[i], prompt, message_id)
               for i, (sample_id, prompt, message_id) in enumerate(zip(header["ids"], header["prompts"],
                                                                       header["messages"]))]  # fmt: skip
    return header["robot_id"], samples


def follow(trainer) -> int:
    """Other ranks: run every round rank 0 announces on this rank's student, holding that robot's adapter state
    (kept in memory since this rank's last round of it, else read from the store rank 0 committed it to)."""
    rounds = 0
    while (task := receive_round()) is not None:
        robot_id, samples = task
        trainer._activate(robot_id).run_round(samples)
        rounds += 1
    return rounds
