"""One process per state folder: a second robot or cloud on a folder another live process holds is refused in one
line naming that process, and a holder that dies (however it dies) leaves the folder free."""

import os
import signal
import subprocess
import sys

import pytest

from cdcca.cli import main
from cdcca.edge.app import build_runtime
from cdcca.edge.runtime import EdgeConfig
from cdcca.envelope import generate_key, trust_key
from cdcca.paths import FolderInUse, FolderLock
from tests.test_transport import free_port

HOLD = """
import sys, time
from pathlib import Path
from cdcca.paths import FolderLock
hold = FolderLock(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture()
def trust(tmp_path):
    private, public = generate_key(tmp_path / "keys", "cloud-1")
    trust_key(public, tmp_path / "trust")
    return private, tmp_path / "trust"


def _holder(folder):
    """A separate process that holds ``folder`` until it is killed."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_folder_held_by_a_process_that_was_killed_is_free_again(tmp_path):
    # Prepare: another process holds the folder
    child = _holder(tmp_path / "edge")
    try:
        # Execute / Assert: refused while it lives, naming its pid
        with pytest.raises(FolderInUse, match=f"in use by another process \\(pid {child.pid}\\)"):
            FolderLock(tmp_path / "edge")
    finally:
        os.kill(child.pid, signal.SIGKILL)  # a crash: nothing runs on the way out
        child.wait()
    # the kernel dropped its hold: the next process takes the folder, and names itself in the lock file
    with FolderLock(tmp_path / "edge") as hold:
        assert hold.path.read_text().strip() == str(os.getpid())
    FolderLock(tmp_path / "edge").release()  # released on exit: taken again


def test_a_second_robot_on_one_state_folder_is_refused_until_the_first_closes(pretrained_test_pair, trust, tmp_path):
    # Prepare: a robot on tmp/edge
    config = EdgeConfig(state_dir=tmp_path / "edge")
    first = build_runtime(pretrained_test_pair, config, trust[1])
    # Execute / Assert: a second one on the same folder is refused before its student loads
    with pytest.raises(FolderInUse, match=str(tmp_path / "edge")):
        build_runtime(pretrained_test_pair, config, trust[1])
    other = build_runtime(pretrained_test_pair, EdgeConfig(state_dir=tmp_path / "other"), trust[1])  # not blocked
    other.close()
    first.close()
    again = build_runtime(pretrained_test_pair, config, trust[1])  # the first robot's close let it go
    again.close()


@pytest.mark.parametrize("verb", ["edge", "cloud"])
def test_the_cli_refuses_a_state_folder_another_process_holds_in_one_line(
    verb, pretrained_test_pair, trust, tmp_path, capsys
):
    # Prepare: another process holds the folder; everything else the verb needs is in place
    (tmp_path / "frames").mkdir()
    child = _holder(tmp_path / "state")
    argv = {"edge": ["edge", "--source", f"dir:{tmp_path / 'frames'}", "--trust", str(trust[1])],
            "cloud": ["cloud", "--key", str(trust[0])]}[verb]  # fmt: skip
    try:
        # Execute
        code = main([*argv, "--state", str(tmp_path / "state"), "--model", str(pretrained_test_pair),
                     "--endpoint", f"tcp/127.0.0.1:{free_port()}"])  # fmt: skip
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    # Assert: exit 2, one line naming the folder and the holder
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2
    assert errors == [f"cdcca {verb}: error: {tmp_path / 'state'} is in use by another process (pid {child.pid}); "
                      "stop that one first, or pass another --state folder"]  # fmt: skip


def test_fleet_workers_share_a_folder_one_process_per_worker_id(pretrained_test_pair, trust, tmp_path):
    # Prepare: the README's fleet: `cdcca cloud --worker-id a`, `--worker-id b` on one --state (and its store)
    from cloud_trainer.app import build_trainer
    from cloud_trainer.service import CloudConfig

    def worker(worker_id):
        config = CloudConfig(state_dir=tmp_path / "cloud", worker_id=worker_id)
        return build_trainer(pretrained_test_pair, trust[0], config, anchor_images=0)

    a, b = worker("a"), worker("b")
    try:
        # Execute / Assert: a second worker a is refused, naming what to change
        with pytest.raises(FolderInUse, match="in use by this process .*give this worker another --worker-id"):
            worker("a")
    finally:
        a.close()
        b.close()
    worker("a").close()  # a's close let its id go


def test_a_build_that_was_never_closed_is_named_as_this_process(tmp_path):
    hold = FolderLock(tmp_path / "edge")
    with pytest.raises(FolderInUse, match=f"in use by this process \\(pid {os.getpid()}\\)"):
        FolderLock(tmp_path / "edge")
    hold.release()
