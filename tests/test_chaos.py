"""Chaos over the real Zenoh link on loopback (issue 15, Build 8), bounded in time and seeded.

A cloud trainer and two robots (``r1``, ``r2``) run the loop on their own Zenoh sessions while an attacker's
session puts malformed, oversized, inconsistent and forged messages on every key the cloud and the robots
subscribe to, interleaved with the robots' valid uploads, then replays captured deltas and acks onto the other
robot's keys and onto the same keys. Afterwards nothing acknowledged is lost, both robots run a new version, and
every bad message is accounted for by the counter of the component that dropped it, by reason.
"""

import random
import threading
import time
from collections import Counter

import numpy as np
import torch

from cdcca import wire
from cdcca.edge.app import build_runtime
from cdcca.edge.runtime import EdgeConfig
from cdcca.envelope import AckRejected, Signer, TrustStore, generate_key, seal, sign_ack, verify_ack
from cdcca.transport import TOPICS, Link, LinkConfig
from cdcca.uts import frame_prompts, pack_tokens
from tests.test_loop_faults import ALL_SAMPLES, Cloud, close_robot
from tests.test_loop_faults import setup as setup  # noqa: F401  (the fixture: keys, checkpoints, endpoint, frames)
from tests.test_transport import wait_until

SEED = 1515
ROBOTS = ("r1", "r2")


def robot(setup, robot_id):
    """A started robot on its own Zenoh session and state directory (every answer uploaded; resends after 2 s)."""
    link = Link(LinkConfig.loopback(False, setup["endpoint"]))
    config = EdgeConfig(robot_id=robot_id, state_dir=setup["tmp"] / robot_id, resend_after_s=2.0,
                        heartbeat_every_s=0.2, uts=ALL_SAMPLES)  # fmt: skip
    return build_runtime(setup["checkpoints"], config, setup["trust"], link).start(), link


class Chaos:
    """The attacker's messages, each with the component and counter that must account for it."""

    def __init__(self, rng: random.Random, limits, mallory: Signer) -> None:
        self.rng, self.limits, self.mallory = rng, limits, mallory
        self.messages: list[tuple[str, str, bytes]] = []  # (key's robot id, topic, payload)
        self.expected: Counter = Counter()  # (who, counter, reason) -> how many

    def add(self, robot_id: str, topic: str, data: bytes, who: str, counter: str, reason: str = "") -> None:
        self.messages.append((robot_id, topic, data))
        self.expected[(who, counter, reason)] += 1

    def junk(self, valid: bytes, type_name: str) -> list[bytes]:
        """Bytes that are not a message of the topic: empty, random, a bad header, 1 MiB of noise, a valid one
        truncated, and random byte mutations of a valid one that no longer decode (checked here, so each one's
        fate is known)."""
        rng = self.rng
        noise = b"\x00\x01\x00\x00" + rng.randbytes(rng.randrange(8, 600))
        found = [b"", rng.randbytes(rng.randrange(1, 64)), b"\x01\x00\x00\x00" + valid[4:], noise,
                 b"\x00\x01\x00\x00" + rng.randbytes(1 << 20),
                 valid[: rng.randrange(4, len(valid) - 1)]]  # fmt: skip
        while len(found) < 9:
            mutated = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(4, len(valid))] = rng.randrange(256)
            try:
                wire.decode(type_name, bytes(mutated))
            except wire.WireError:
                found.append(bytes(mutated))
        return found

    def sample(self, robot_id: str, **fields):
        """A well-formed UtsTokens of the models' grid (fp16, a few random kept tokens), ``fields`` replaced."""
        n, d = self.limits.num_tokens, self.limits.token_dim
        keep = torch.zeros(n, dtype=torch.bool)
        keep[sorted(self.rng.sample(range(n), 3))] = True
        msg = pack_tokens(torch.randn(n, d), keep, torch.rand(n), robot_id=robot_id,
                          sample_id=f"chaos-{self.rng.getrandbits(48):x}", adapter_version=0, prompt="what digit?",
                          student_answer="7", sample_entropy=1.0, encoding="fp16")  # fmt: skip
        for name, value in fields.items():
            setattr(msg, name, value)
        return msg

    def uploads(self, robot_id: str, other: str) -> None:
        """On ``<robot_id>/cdcca/uts_tokens``: what the cloud's link drops and what admission rejects, by reason."""
        for data in self.junk(wire.encode(self.sample(robot_id)), wire.UTS_TOKENS):
            self.add(robot_id, "uts_tokens", data, "cloud", "link", "uts_tokens")
        self.add(robot_id, "uts_tokens", wire.encode(self.sample(other)), "cloud", "link", "uts_tokens")  # spoofed
        n, d = self.limits.num_tokens, self.limits.token_dim
        nan = np.full(3 * d, np.float16(np.nan)).view(np.uint8)
        bad = {
            "token_grid": [self.sample(robot_id, num_tokens=n + 1), self.sample(robot_id, num_tokens=65535,
                                                                                token_dim=65535)],
            "token_dim": [self.sample(robot_id, token_dim=d + 3)],
            "oversized": [self.sample(robot_id, student_answer="x" * (self.limits.max_message_bytes + 1)),
                          self.sample(robot_id, student_answer="y" * (self.limits.max_answer_chars + 1))],
            "sample_id": [self.sample(robot_id, sample_id=""), self.sample(robot_id, sample_id="s" * 257)],
            "prompt_too_long": [self.sample(robot_id, prompt="digit " * (self.limits.max_prompt_tokens + 1))],
            "inconsistent": [self.sample(robot_id, token_indices=np.array([5, 2, 9], np.uint16)),
                             self.sample(robot_id, token_variance=np.zeros(7, np.float32)),
                             self.sample(robot_id, token_data=np.zeros(5, np.uint8)),
                             self.sample(robot_id, num_tokens=0)],
            "encoding": [self.sample(robot_id, encoding=7)],
            "not_finite": [self.sample(robot_id, token_data=nan.copy())],
        }  # fmt: skip
        for reason, messages in bad.items():
            for msg in messages:
                self.add(robot_id, "uts_tokens", wire.encode(msg), "cloud", "rejected", reason)

    def statuses(self, robot_id: str, other: str) -> None:
        """On ``<robot_id>/cdcca/adapter_status``: junk, spoofed, a state that is none, a version never published."""
        status = wire.new(wire.ADAPTER_STATUS, header=wire.header(time.time_ns()), robot_id=robot_id, version=0,
                          state=wire.APPLIED, reason="heartbeat")  # fmt: skip
        for data in self.junk(wire.encode(status), wire.ADAPTER_STATUS):
            self.add(robot_id, "adapter_status", data, "cloud", "link", "adapter_status")
        spoofed = wire.new(wire.ADAPTER_STATUS, robot_id=other, version=0, state=wire.APPLIED)
        self.add(robot_id, "adapter_status", wire.encode(spoofed), "cloud", "link", "adapter_status")
        for state in (3, 200):
            msg = wire.new(wire.ADAPTER_STATUS, robot_id=robot_id, version=0, state=state, reason="heartbeat")
            self.add(robot_id, "adapter_status", wire.encode(msg), "cloud", "statuses_ignored", "state")
        for version, state in ((1000 + self.rng.randrange(1000), wire.APPLIED), (2**32 - 1, wire.ROLLED_BACK)):
            msg = wire.new(wire.ADAPTER_STATUS, robot_id=robot_id, version=version, state=state,
                           reason="rolled back from v4294967295: forged")  # fmt: skip
            self.add(robot_id, "adapter_status", wire.encode(msg), "cloud", "statuses_ignored", "version")

    def deltas(self, robot_id: str, other: str, trusted_key_id: str) -> None:
        """On ``<robot_id>/cdcca/weight_delta``: junk, spoofed, and forged deltas the robot must reject."""
        rng = self.rng
        payload = rng.randbytes(256)
        signed = seal(payload, robot_id=robot_id, version=1000, base_version=0, keyframe=True, codec="nf4-zstd",
                      num_params=123, signer=self.mallory)  # fmt: skip
        for data in self.junk(wire.encode(signed), wire.WEIGHT_DELTA):
            self.add(robot_id, "weight_delta", data, robot_id, "link", "weight_delta")
        spoofed = seal(payload, robot_id=other, version=1001, base_version=0, keyframe=True, codec="nf4-zstd",
                       num_params=123, signer=self.mallory)  # fmt: skip
        self.add(robot_id, "weight_delta", wire.encode(spoofed), robot_id, "link", "weight_delta")
        self.add(robot_id, "weight_delta", wire.encode(signed), robot_id, "deltas_rejected")  # an untrusted key
        forged = seal(payload, robot_id=robot_id, version=1002, base_version=0, keyframe=True, codec="nf4-zstd",
                      num_params=123, signer=self.mallory)  # fmt: skip
        forged.key_id = trusted_key_id  # claims the cloud's key: the signature does not verify
        self.add(robot_id, "weight_delta", wire.encode(forged), robot_id, "deltas_rejected")
        forged.signature = np.frombuffer(rng.randbytes(64), np.uint8).copy()
        self.add(robot_id, "weight_delta", wire.encode(forged), robot_id, "deltas_rejected")
        huge = seal(rng.randbytes(4 << 20), robot_id=robot_id, version=1003, base_version=0, keyframe=True,
                    codec="nf4-zstd", num_params=2**40, signer=self.mallory)  # fmt: skip
        self.add(robot_id, "weight_delta", wire.encode(huge), robot_id, "deltas_rejected")  # 4 MiB, untrusted

    def acks(self, robot_id: str, other: str, trusted_key_id: str) -> None:
        """On ``<robot_id>/cdcca/uts_ack``: junk, spoofed, and acks not signed by the cloud, naming ids the robot
        queues (issue 15 D6: an unsigned one used to delete them)."""
        queued = [f"{robot_id}-{i}" for i in range(6)]
        sequence = 2**62 + self.rng.randrange(1000)  # far ahead of the cloud's: only the signature stops them
        signed = sign_ack(self.mallory, robot_id, queued, sequence, time.time_ns())
        for data in self.junk(wire.encode(signed), wire.UTS_ACK):
            self.add(robot_id, "uts_ack", data, robot_id, "link", "uts_ack")
        spoofed = sign_ack(self.mallory, other, [f"{other}-0"], sequence)
        self.add(robot_id, "uts_ack", wire.encode(spoofed), robot_id, "link", "uts_ack")
        unsigned = wire.new(wire.UTS_ACK, header=wire.header(time.time_ns()), robot_id=robot_id, sample_ids=queued,
                            sequence=sequence)  # fmt: skip
        self.add(robot_id, "uts_ack", wire.encode(unsigned), robot_id, "acks_rejected", "unsigned")
        self.add(robot_id, "uts_ack", wire.encode(signed), robot_id, "acks_rejected", "unknown_key")
        signed.key_id = trusted_key_id  # claims the cloud's key: the signature does not verify
        self.add(robot_id, "uts_ack", wire.encode(signed), robot_id, "acks_rejected", "bad_signature")


def observed(cloud, runtimes, links) -> Counter:
    """The counters that account for bad messages, in the keys of :attr:`Chaos.expected`."""
    found = Counter()
    for topic, count in cloud.link.rejected.items():
        found[("cloud", "link", topic)] += count
    for reason, count in cloud.trainer.counters.rejected_reasons.items():
        found[("cloud", "rejected", reason)] += count
    for reason, count in cloud.trainer.counters.statuses_ignored.items():
        found[("cloud", "statuses_ignored", reason)] += count
    for robot_id in ROBOTS:
        for topic, count in links[robot_id].rejected.items():
            found[(robot_id, "link", topic)] += count
        found[(robot_id, "deltas_rejected", "")] += runtimes[robot_id].counters.deltas_rejected
        for reason, count in runtimes[robot_id].counters.acks_rejected_reasons.items():
            found[(robot_id, "acks_rejected", reason)] += count
    return +found


def test_chaos_on_every_key_loses_nothing_acknowledged_and_every_bad_message_is_counted(setup, tmp_path):
    # Prepare: the cloud, two robots and an attacker on their own Zenoh sessions; the attack, seeded
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    mallory = Signer.load(generate_key(tmp_path / "mallory", "mallory")[0])
    cloud = Cloud(setup, round_size=len(setup["ids"]) // 3)  # a robot's uploads: one per frame of three prompts
    runtimes, links = {}, {}
    for robot_id in ROBOTS:
        runtimes[robot_id], links[robot_id] = robot(setup, robot_id)
    attacker = Link(LinkConfig.loopback(False, setup["endpoint"]), blocking=set(TOPICS))  # its every put arrives
    captured: dict[tuple[str, str], list[bytes]] = {}  # what the cloud really sent (not the attacker's own)
    trust = TrustStore.load(setup["trust"])

    def capture(robot_id, msg, data):
        if hasattr(msg, "version"):
            if msg.version < 1000:
                captured.setdefault((robot_id, "weight_delta"), []).append(data)
            return
        try:
            verify_ack(msg, trust=trust, robot_id=robot_id)  # signed by the cloud
        except AckRejected:
            return
        captured.setdefault((robot_id, "uts_ack"), []).append(data)

    for robot_id in ROBOTS:
        for topic in ("weight_delta", "uts_ack"):
            attacker.subscribe(robot_id, topic, capture)
    chaos = Chaos(rng, cloud.trainer.admission.limits, mallory)
    for robot_id, other in (("r1", "r2"), ("r2", "r1")):
        chaos.uploads(robot_id, other)
        chaos.statuses(robot_id, other)
        chaos.deltas(robot_id, other, "cloud-test")
        chaos.acks(robot_id, other, "cloud-test")
    rng.shuffle(chaos.messages)
    assert sum(chaos.expected.values()) == len(chaos.messages)  # every bad message is counted
    try:
        assert wait_until(lambda: attacker.peers() >= 3 and all(link.peers() >= 2 for link in links.values()))
        keys = {(robot_id, topic) for robot_id, topic, _ in chaos.messages}
        unmatched = lambda: [k for k in keys if not attacker.matched(*k)]  # noqa: E731
        assert wait_until(lambda: not unmatched()), unmatched()

        # Execute: the attack on one thread while both robots answer (and upload) in interleaved batches
        def attack():
            for robot_id, topic, data in chaos.messages:
                attacker.publish_bytes(robot_id, topic, data)
                time.sleep(rng.uniform(0.0, 0.02))

        attacker_thread = threading.Thread(target=attack, daemon=True)
        attacker_thread.start()
        images, prompts = setup["images"], setup["prompts"]
        for start in range(0, len(prompts), 6):
            for robot_id in ROBOTS:
                ids = [f"{robot_id}-{i}" for i in range(start, min(start + 6, len(prompts)))]
                runtimes[robot_id].ask(images[start : start + 6], prompts[start : start + 6], ids)
        attacker_thread.join(timeout=60)
        assert not attacker_thread.is_alive()
        assert wait_until(lambda: all(r.backend.version == 1 for r in runtimes.values()), timeout=90)
        assert wait_until(lambda: all(len(r.uplink) == 0 for r in runtimes.values()), timeout=30)
        seen = lambda: observed(cloud, runtimes, links)  # noqa: E731
        assert wait_until(lambda: seen() == +chaos.expected, timeout=45), \
            {"observed, not expected": seen() - chaos.expected, "expected, not observed": chaos.expected - seen()}

        # ... then replays of what the cloud really sent, onto the other robot's keys and onto the same key
        assert wait_until(lambda: cloud.trainer.stats()["reported"] == {"r1": 1, "r2": 1})  # no resend from now
        resends = {r: len(captured[(r, "weight_delta")]) - 1 for r in ROBOTS}  # v1 again (a robot slow to report)
        assert sum(resends.values()) == cloud.trainer.counters.resends
        for robot_id, other in (("r1", "r2"), ("r2", "r1")):
            attacker.publish_bytes(other, "weight_delta", captured[(robot_id, "weight_delta")][0])
            chaos.expected[(other, "link", "weight_delta")] += 1  # robot_id inside != the key's
            attacker.publish_bytes(other, "uts_ack", captured[(robot_id, "uts_ack")][0])
            chaos.expected[(other, "link", "uts_ack")] += 1
            attacker.publish_bytes(robot_id, "weight_delta", captured[(robot_id, "weight_delta")][0])
            attacker.publish_bytes(robot_id, "uts_ack", captured[(robot_id, "uts_ack")][0])
            chaos.expected[(robot_id, "acks_rejected", "replayed")] += 1  # older than the last accepted
        assert wait_until(lambda: all(r.counters.deltas_duplicate >= 1 for r in runtimes.values()))
        seen = lambda: observed(cloud, runtimes, links)  # noqa: E731
        assert wait_until(lambda: seen() == +chaos.expected, timeout=45), \
            {"observed, not expected": seen() - chaos.expected, "expected, not observed": chaos.expected - seen()}

        # Assert: nothing acknowledged is lost, both robots updated, every bad message accounted for
        stats = cloud.trainer.stats()
        for robot_id, runtime in runtimes.items():
            robot_stats = runtime.stats()
            sent = {f"{robot_id}-{i}" for i in range(len(prompts))}
            uploads = {f"{robot_id}-{i}" for i in range(0, len(prompts), 3)}  # one per frame of three prompts
            assert cloud.trainer.store.sample_ids(robot_id) == uploads  # every acked upload is stored, no forged one
            carried = {p.sample_id for _, payload in cloud.trainer.store.used(robot_id, len(prompts))
                       for p in frame_prompts(wire.decode(wire.UTS_TOKENS, payload))}  # fmt: skip
            assert carried == sent  # ... with every sample in it, and round v1 trained on them
            assert robot_stats["uplink_acked"] == robot_stats["uplink_enqueued"] == len(uploads)
            assert robot_stats["acks_accepted"] >= len(uploads)  # every other ack is in the counters checked above
            assert robot_stats["deltas_applied"] == 1  # the replay and any resend of v1 are duplicates
            assert robot_stats["deltas_duplicate"] == 1 + resends[robot_id]
            assert runtime.backend.slot.counters.rejected == chaos.expected[(robot_id, "deltas_rejected", "")] == 4
            assert runtime.ask(images[:1], prompts[:1])[0].adapter_version == 1
            assert "handler_error" not in str(dict(links[robot_id].rejected))
        assert stats["versions"] == {"r1": 1, "r2": 1} and stats["reported"] == {"r1": 1, "r2": 1}
        assert stats["quarantine"] == {} and stats["round_failures"] == 0 and stats["declined"] == {}
        assert stats["received"] == 2 * len(prompts) // 3 and stats["stored"] == 2 * len(prompts) // 3  # uploads
        assert stats["rejected"] == sum(n for (who, what, _), n in chaos.expected.items()
                                        if (who, what) == ("cloud", "rejected"))  # fmt: skip
        assert "handler_error" not in str(dict(cloud.link.rejected))
    finally:
        attacker.close()
        for robot_id in ROBOTS:
            close_robot(runtimes[robot_id], links[robot_id])
        cloud.stop()


def test_a_forged_ack_naming_queued_samples_deletes_nothing(setup, tmp_path):
    # Prepare: no cloud; the attacker's session is the one the robot connects to
    attacker = Link(LinkConfig.loopback(True, setup["endpoint"]))
    runtime, link = robot(setup, "r1")
    try:
        assert wait_until(lambda: link.peers() >= 1)
        time.sleep(0.5)
        ids = [f"r1-{i}" for i in range(6)]
        runtime.ask([image.copy() for image in setup["images"][:6]], setup["prompts"][:6], ids)  # 6 frames
        assert sorted(runtime.uplink.ids()) == ids

        # Execute: well-formed acks, on r1's key, from a peer that stored nothing: unsigned, and signed by its own key
        mallory = Signer.load(generate_key(tmp_path / "mallory", "mallory")[0])
        attacker.publish("r1", "uts_ack", wire.new(wire.UTS_ACK, robot_id="r1", sample_ids=ids, sequence=2**62))
        attacker.publish("r1", "uts_ack", sign_ack(mallory, "r1", ids, 2**62))
        assert wait_until(lambda: runtime.counters.acks_rejected == 2, timeout=10)

        # Assert
        assert sorted(runtime.uplink.ids()) == ids and runtime.stats()["uplink_acked"] == 0
        assert runtime.counters.acks_rejected_reasons == {"unsigned": 1, "unknown_key": 1}
        assert runtime.stats()["uplink_ack_sequence"] == 0
    finally:
        close_robot(runtime, link)
        attacker.close()
