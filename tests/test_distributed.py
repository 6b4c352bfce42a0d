"""AKD data-parallel over 2 CPU processes (gloo), as under ``torchrun --nproc-per-node 2``: the ranks end with
identical weights, and the cloud trainer's rank 0 drives the other rank's rounds by broadcast."""

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from tests.test_transport import free_port


def _worker(rank, world, port, checkpoints, key, out):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    from cdcca.akd import AKDConfig, DistillSample
    from cdcca.data.digits_shift import load_domain
    from cdcca.envelope import Signer
    from cdcca.models.checkpoint import load_adaptable_student, load_mllm
    from cloud_trainer.distributed import follow, init_from_env, send_round, send_stop
    from cloud_trainer.service import CloudConfig, CloudTrainer

    assert init_from_env() == (rank, world)
    config = CloudConfig(state_dir=f"{out}/cloud", round_size=8, codec="fp16", akd=AKDConfig(steps=4, batch_size=8))
    make = lambda: load_adaptable_student(checkpoints)  # noqa: E731
    trainer = CloudTrainer(load_mllm(f"{checkpoints}/teacher"), make, Signer.load(key), config)
    if rank == 0:
        student = load_mllm(f"{checkpoints}/student")
        samples = DistillSample.from_samples(student, load_domain("printed", "stream", limit=4))
        for robot_id in ("r1", "r2", "r1"):  # the rounds of two robots, as the service runs them
            send_round(robot_id, samples)
            trainer._activate(robot_id).run_round(samples)
        send_stop()
        rounds = 3
    else:
        rounds = follow(trainer)
    params = {f"{r}.{k}": v.detach().clone()  # each robot's adapter state, swapped into the rank's one student
              for r in ("r1", "r2") for k, v in trainer._activate(r).trainable.items()}  # fmt: skip
    save_file(params, f"{out}/rank{rank}.safetensors", metadata={"rounds": json.dumps(rounds)})
    dist.destroy_process_group()


def test_two_gloo_ranks_end_with_identical_weights(pretrained_test_pair, tmp_path):
    from cdcca.envelope import generate_key
    from cdcca.models.checkpoint import load_adaptable_student
    from cdcca.models.trainable import trainable_parameters

    private, _ = generate_key(tmp_path / "keys", "cloud-test")
    mp.spawn(_worker, args=(2, free_port(), str(pretrained_test_pair), str(private), str(tmp_path)), nprocs=2)
    first, second = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)  # bit-identical across ranks
    base = trainable_parameters(load_adaptable_student(pretrained_test_pair))
    assert any(not torch.equal(first[f"r1.{k}"], base[k]) for k in base)  # and they did train
    assert any(not torch.equal(first[f"r1.{k}"], first[f"r2.{k}"]) for k in base)  # r1 ran two rounds, r2 one
