"""``cdcca`` errors (issue 17, "Errors"): every user-facing failure is one line on stderr saying what to do, exit 2,
no traceback; Ctrl-C is one line and exit 130; a bug is one line, exit 1, the traceback only with --verbose."""

import hashlib
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdcca.cli import main
from cdcca.envelope import generate_key, trust_key
from tests.test_transport import free_port

ROOT = Path(__file__).resolve().parents[1]


def _run(argv, capsys) -> tuple[int, list[str], str]:
    """``main(argv)``: (exit code, the non-empty stderr lines, stdout); argparse's own exits count too."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()], captured.out


def _one_error_line(argv, capsys, *expected: str, code: int = 2, quiet: bool = True) -> str:
    exit_code, errors, out = _run(argv, capsys)
    assert exit_code == code, (exit_code, errors)
    assert len(errors) == 1, errors
    missing = [text for text in expected if text not in errors[0]]
    assert missing == [], errors[0]
    assert "Traceback" not in errors[0]
    if quiet:
        assert out == ""
    return errors[0]


@pytest.fixture()
def trust_dir(tmp_path):
    _, public = generate_key(tmp_path / "keys", "cloud-1")
    trust_key(public, tmp_path / "trust")
    return tmp_path / "trust"


@pytest.fixture()
def model_dir(pair, tmp_path):
    """A model folder (teacher/ + student/) of the ``test`` preset, built from config: no training, no download."""
    from cdcca.models.checkpoint import save_mllm

    teacher, student = pair
    save_mllm(teacher, tmp_path / "model" / "teacher")
    save_mllm(student, tmp_path / "model" / "student")
    return tmp_path / "model"


# ------------------------------------------------------------------------------------------ options, at start
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["edge", "--preset", "huge", "--source", "dir:x"], ["--preset", "'huge'", "'test', 'tiny'"]),
        (["cloud", "--round-size", "0"], ["--round-size", "must be a positive integer, got 0"]),
        (["cloud", "--check-fraction", "1"], ["--check-fraction", "must be a fraction in [0, 1), got 1"]),
        (["cloud", "--pseudo-label-keep", "0"], ["--pseudo-label-keep", "(0, 1]"]),
        (["cloud", "--lr", "nan"], ["--lr", "must be a number > 0"]),
        (["cloud", "--flush-after", "inf"], ["--flush-after", "must be a number > 0, got inf"]),
        (["cloud", "--steps", "ten"], ["--steps", "expected an integer, got 'ten'"]),
        (["edge", "--source", "dir:x", "--rate", "-1"], ["--rate", "must be a number >= 0, got -1"]),
        (["edge", "--source", "dir:x", "--batch-size", "-3"], ["--batch-size", "positive integer"]),
        (["edge", "--source", "dir:x", "--linger", "-5"], ["--linger", "-1 for until Ctrl-C"]),
        (["edge", "--source", "dir:x", "--backend", "tensorrt"], ["--backend", "'torch', 'onnx'"]),
        (["demo", "--port", "70000"], ["--port", "1..65535"]),
        (["eval", "--domains", "mars"], ["--domains", "'mars'"]),
        (["edg"], ["invalid choice: 'edg'", "'edge'"]),
        (["keys", "trust"], ["PUBFILE"]),
        (["info", "--threads", "99999"], ["--threads", "1..1024, got 99999"]),
        (["edge", "--source", "dir:x", "--robot-id", "../../x"], ["--robot-id", "letters, digits and _", "'../../x'"]),
        (["bench", "adapt", "--methods", "magic"], ["'magic'", "'cdcca'"]),
        (["pretrain", "--seed", str(2**64)], ["--seed", "0..2**63-1", str(2**64)]),  # numpy refused it mid-run
        (["cloud", "--seed", "-1"], ["--seed", "0..2**63-1, got -1"]),
        (["pretrain", "--precision", "fp16"], ["--precision", "'fp16'", "'bf16'"]),
    ],
)
def test_a_bad_option_is_one_line_and_exit_2_before_anything_loads(argv, expected, capsys):
    line = _one_error_line(argv, capsys, *expected)
    assert line.startswith("cdcca") and "--help" in line


def test_an_unknown_codec_fails_before_the_models_load(capsys, tmp_path):
    # the pair's folders are empty: had anything loaded first, the error would be about them
    for role in ("teacher", "student"):
        (tmp_path / "pair" / role).mkdir(parents=True)
    _one_error_line(["cloud", "--codec", "zip", "--model", tmp_path / "pair", "--state", tmp_path / "s"], capsys,
                    "unknown codec 'zip'", "nf4-zstd")  # fmt: skip


def test_bench_fleet_takes_only_a_postgresql_store(capsys):
    # parse only: had the check gone, main() would run a whole fleet benchmark (`mysql://x` made a SQLite file)
    from cdcca.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "fleet", "--store", "mysql://x"])
    assert exit_info.value.code == 2
    assert "--store: expected a postgresql:// URL" in capsys.readouterr().err
    assert build_parser().parse_args(["bench", "fleet", "--store", "postgresql://h/db"]).store == "postgresql://h/db"


def test_a_round_size_over_the_round_limit_names_both_flags_before_the_models_load(capsys, tmp_path):
    # the pair's folder does not exist: had anything loaded first, the error would be about it
    _one_error_line(["cloud", "--round-size", "10", "--max-round-samples", "5", "--model", tmp_path / "none",
                     "--state", tmp_path / "s"], capsys,
                    "--round-size 10 is more than --max-round-samples 5")  # fmt: skip


@pytest.mark.parametrize(("content", "expected"), [
    ("SHIFTS = [\n", "SyntaxError: '[' was never closed"),
    ("raise RuntimeError('boom')\n", "RuntimeError: boom"),
])  # fmt: skip
def test_a_shifts_file_that_fails_to_load_is_one_line_before_any_model_loads(content, expected, capsys, tmp_path):
    # Prepare: a shifts file that cannot run, and no models at all (they would load first and fail otherwise)
    shifts = tmp_path / "shifts.py"
    shifts.write_text(content)
    # Execute / Assert: exit 2 naming the file and what went wrong in it (it was "unexpected", exit 1)
    _one_error_line(["bench", "adapt", "--shifts", str(shifts), "--model", tmp_path / "none"], capsys,
                    f"--shifts {shifts} failed to load", expected)  # fmt: skip


def test_a_live_camera_that_is_not_connected_fails_before_the_student_loads(capsys, tmp_path):
    rs = pytest.importorskip("pyrealsense2", reason="pyrealsense2 is not installed (needs Debian's libusb-1.0-0)")
    if len(rs.context().query_devices()) > 0:
        pytest.skip("a RealSense camera is connected to this machine")
    _one_error_line(["edge", "--source", "realsense", "--model", tmp_path / "none"], capsys,
                    "no RealSense camera is connected", "--source realsense:FILE")  # fmt: skip


def test_an_unreachable_store_fails_before_the_teacher_loads(capsys, tmp_path, trust_dir):
    pytest.importorskip("psycopg", reason="the PostgreSQL store needs psycopg")
    for role in ("teacher", "student"):  # empty: had the teacher loaded first, the error would be about it
        (tmp_path / "pair" / role).mkdir(parents=True)
    _one_error_line(["cloud", "--store", "postgresql://u@127.0.0.1:1/db", "--model", tmp_path / "pair", "--state",
                     tmp_path / "s", "--key", tmp_path / "keys" / "cloud-1.key", "--endpoint",
                     f"tcp/127.0.0.1:{free_port()}"], capsys,
                    "cannot reach the --store postgresql://u@127.0.0.1:1/db")  # fmt: skip


# ------------------------------------------------------------------------------------------ files and folders
@pytest.mark.parametrize(
    ("source", "expected"),
    [("camera0", "is not a source; use bag:PATH"), ("bag:", "is not a source"),
     ("bag:{tmp}/none#/camera/image_raw", "{tmp}/none does not exist"), ("dir:{tmp}/frames", "does not exist")],
)  # fmt: skip
def test_a_bad_source_fails_before_the_student_loads(source, expected, capsys, tmp_path):
    source, expected = source.format(tmp=tmp_path), expected.format(tmp=tmp_path)
    _one_error_line(["edge", "--source", source, "--model", tmp_path / "none"], capsys, f"--source {source!r}",
                    expected)  # fmt: skip


@pytest.mark.parametrize("verb", [["edge", "--source", "dir:{tmp}"], ["cloud"]], ids=lambda v: v[0])
def test_an_unwritable_state_folder_is_one_line_naming_it(verb, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    verb = [a.format(tmp=tmp_path) for a in verb]
    _one_error_line([*verb, "--state", blocker / "state", "--model", tmp_path / "none"], capsys,
                    f"--state folder {blocker / 'state'}", "writable")  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["pretrain", "--preset", "test", "--out", "{blocker}/model"], "--out"),
        (["demo", "--preset", "test", "--workdir", "{blocker}/run"], "--workdir"),
        (["export", "--model", "{tmp}/none", "--out", "{blocker}/onnx"], "--out"),
        (["make-bag", "{blocker}/bag"], "PATH"),
        (["keys", "generate", "--dir", "{blocker}/keys"], "--dir"),
        (["eval", "--model", "{tmp}/none", "--plot", "{blocker}/eval.png"], "--plot"),
    ],
    ids=lambda v: v if isinstance(v, str) else v[0],
)
def test_an_output_path_under_a_file_fails_before_any_work(argv, flag, capsys, tmp_path):
    # Prepare: a file where a folder should be (root may write anywhere else, so permissions cannot stand in)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = [a.format(blocker=blocker, tmp=tmp_path) for a in argv]
    # Execute / Assert: refused at start (pretrain would otherwise train for minutes, then fail to save)
    started = time.monotonic()
    _one_error_line(argv, capsys, f"cannot write {flag} {blocker}/", f"{blocker} is not a writable folder")
    assert time.monotonic() - started < 5.0


def test_json_on_a_full_disk_is_one_line_naming_the_file(capsys, tmp_path, trust_dir):
    # /dev/full accepts the open and fails the write with ENOSPC, as a full disk does
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    _one_error_line(["keys", "list", "--store", trust_dir, "--json", "/dev/full"], capsys,
                    "no space left on the device writing /dev/full", quiet=False)  # fmt: skip


def test_json_where_nothing_may_be_written_is_one_line_naming_the_file(capsys, tmp_path, trust_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _one_error_line(["keys", "list", "--store", trust_dir, "--json", blocker / "report.json"], capsys,
                    str(blocker / "report.json"), "--json")  # fmt: skip
    _one_error_line(["keys", "list", "--store", trust_dir, "--json", tmp_path], capsys, "is a folder")


def test_json_into_a_read_only_place_is_one_line(capsys, trust_dir):
    # sysfs refuses new files even to root (EACCES); a non-root user is stopped before the run (not writable)
    _one_error_line(["keys", "list", "--store", trust_dir, "--json", "/sys/cdcca-report.json"], capsys,
                    "/sys/cdcca-report.json", quiet=False)  # fmt: skip


def test_a_truncated_model_file_names_it_and_says_how_to_rebuild(model_dir, capsys, tmp_path):
    # Prepare: a copy cut short
    weights = model_dir / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # Execute / Assert: export loads the student first
    _one_error_line(["export", "--model", model_dir, "--out", tmp_path / "onnx"], capsys,
                    str(weights), "cdcca pretrain", "--model")  # fmt: skip


def test_a_broken_config_json_names_it(model_dir, capsys, tmp_path):
    config = model_dir / "student" / "config.json"
    config.write_text(config.read_text()[:40])
    _one_error_line(["export", "--model", model_dir, "--out", tmp_path / "onnx"], capsys,
                    str(config), "cdcca pretrain")  # fmt: skip


def test_a_plot_whose_extension_matplotlib_cannot_write_fails_before_any_work(capsys, tmp_path):
    # the model folder does not exist: had the evaluation run first, the error would be about it (and its JSON lost)
    _one_error_line(["eval", "--model", tmp_path / "none", "--plot", tmp_path / "p.txt", "--json", tmp_path / "e.json"],
                    capsys, "--plot", "p.txt", ".png")  # fmt: skip


@pytest.mark.parametrize("verb", [["edge", "--source", "dir:{tmp}", "--trust", "{tmp}/trust", "--state", "{tmp}/s"],
                                  ["cloud", "--key", "{tmp}/keys/cloud-1.key", "--state", "{tmp}/s"], ["export"]],
                         ids=lambda v: v[0])  # fmt: skip
def test_a_model_folder_that_is_not_a_pair_is_named_before_anything_loads(verb, model_dir, trust_dir, capsys,
                                                                         tmp_path, monkeypatch):  # fmt: skip
    argv = [str(a).format(tmp=tmp_path) for a in verb]
    monkeypatch.chdir(tmp_path)
    _one_error_line(argv + ["--model", "ckpt"], capsys, "--model ckpt: no such folder", "cdcca pretrain")
    _one_error_line(argv + ["--model", model_dir / "student"], capsys, "is one model's folder", str(model_dir))


def test_a_missing_model_folder_points_at_pretrain(capsys, tmp_path):
    _one_error_line(["export", "--model", tmp_path / "none"], capsys, "cdcca pretrain")


# ------------------------------------------------------------------------------------------------ the link
@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"connect": "tcp/127.0.0.1:7447"}, "'connect' must be a list of endpoint strings, got \"tcp/127.0.0.1:7447\""),
        ({"connect": [5]}, "'connect' must be a list of endpoint strings, got [5]"),
        ({"tls_mutual": "yes"}, "'tls_mutual' must be true or false"),
        ({"conect": ["tcp/127.0.0.1:7447"]}, "unknown keys ['conect']"),
        ("{not json", "Expecting property name"),
        ("[]", "a link configuration is a JSON object"),
        ("null", "a link configuration is a JSON object"),
    ],
    ids=["connect-as-a-string", "connect-not-strings", "flag-as-a-string", "misspelt-key", "not-json", "a-list",
         "null"],
)
def test_a_link_configuration_zenoh_refuses_is_one_line(config, expected, capsys, tmp_path, trust_dir):
    link = tmp_path / "link.json"
    link.write_text(config if isinstance(config, str) else json.dumps(config))
    # the model folder does not exist: the link is checked before the student loads
    line = _one_error_line(["edge", "--source", f"dir:{tmp_path}", "--link", link, "--trust", trust_dir, "--state",
                            tmp_path / "state", "--model", tmp_path / "none"], capsys,
                           f"cannot open the link ({link}): ", expected)  # fmt: skip
    assert ".rs:" not in line  # no Rust source paths


# ------------------------------------------------------------------------------------------------ the keys
def _fingerprint(public: Path) -> str:
    return hashlib.sha256(bytes.fromhex(public.read_text().strip())).hexdigest()


def test_keys_trust_refuses_another_key_under_a_trusted_id_unless_replace(capsys, tmp_path):
    # Prepare: two different keys that both call themselves cloud-1
    _, first = generate_key(tmp_path / "a", "cloud-1")
    _, second = generate_key(tmp_path / "b", "cloud-1")
    store = tmp_path / "trust"
    assert _run(["keys", "trust", first, "--store", store], capsys)[0] == 0
    # Execute / Assert: refused in one line naming both fingerprints; the store keeps the first key
    _one_error_line(["keys", "trust", second, "--store", store], capsys,
                    _fingerprint(first), _fingerprint(second), "--replace")  # fmt: skip
    assert (store / "cloud-1.pub").read_text() == first.read_text()
    # with --replace the new key takes the id, and keys list shows its fingerprint
    code, errors, out = _run(["keys", "trust", second, "--store", store, "--replace"], capsys)
    assert code == 0 and errors == [] and _fingerprint(second) in out
    assert (store / "cloud-1.pub").read_text().strip() == second.read_text().strip()
    code, _, listing = _run(["keys", "list", "--store", store], capsys)
    assert code == 0 and _fingerprint(second) in listing and _fingerprint(first) not in listing


def test_a_robot_started_on_a_trust_store_without_keys_warns_that_every_update_will_be_rejected(capsys, caplog,
                                                                                                 tmp_path):
    # Prepare: an empty trust folder (accepted: a key may be trusted later, the robot reads the store again)
    (tmp_path / "trust").mkdir()
    (tmp_path / "frames").mkdir()
    # Execute: the model folder is missing, so the run stops right after the store is read
    code, _, _ = _run(["edge", "--source", f"dir:{tmp_path / 'frames'}", "--trust", tmp_path / "trust",
                       "--state", tmp_path / "s", "--model", tmp_path / "none"], capsys)  # fmt: skip
    # Assert
    assert code == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("trusts no key: every update from the cloud will be rejected" in w for w in warnings), warnings


def test_keys_trust_refuses_a_key_already_trusted_under_another_id(capsys, tmp_path):
    # Prepare: cloud-1 and cloud-2 trusted; cloud-1's public key copied as alias.pub
    _, public = generate_key(tmp_path / "keys", "cloud-1")
    _, successor = generate_key(tmp_path / "keys", "cloud-2")
    alias = tmp_path / "alias.pub"
    alias.write_text(public.read_text())
    store = tmp_path / "trust"
    for key in (public, successor):
        assert _run(["keys", "trust", key, "--store", store], capsys)[0] == 0
    # Execute / Assert: refused, naming the id it has (revoking `alias` would have ended cloud-1 too, on a robot's
    # next start, and let the last key go past the guard that keeps one)
    _one_error_line(["keys", "trust", alias, "--store", store], capsys, "already trusted as 'cloud-1'",
                    "a key is trusted under one id")  # fmt: skip
    assert not (store / "alias.pub").exists()


def test_keys_trust_replace_never_brings_back_a_revoked_key(capsys, tmp_path):
    # Prepare: cloud-1 revoked after cloud-2 took over
    _, old = generate_key(tmp_path / "a", "cloud-1")
    _, new = generate_key(tmp_path / "b", "cloud-2")
    store = tmp_path / "trust"
    for public in (old, new):
        trust_key(public, store)
    assert _run(["keys", "revoke", "cloud-1", "--store", store], capsys)[0] == 0
    # Execute / Assert
    _one_error_line(["keys", "trust", old, "--store", store, "--replace"], capsys, "revoked")


def test_trusting_a_private_key_file_says_to_pass_its_public_half(capsys, tmp_path):
    private, public = generate_key(tmp_path / "keys", "cloud-9")
    _one_error_line(["keys", "trust", private, "--store", tmp_path / "trust"], capsys, "is a private key", str(public))
    assert not (tmp_path / "trust" / "cloud-9.pub").exists()


def test_a_missing_public_key_file_is_one_line(capsys, tmp_path):
    _one_error_line(["keys", "trust", tmp_path / "nope.pub", "--store", tmp_path / "trust"], capsys,
                    str(tmp_path / "nope.pub"))  # fmt: skip


# ----------------------------------------------------------------------------------- Ctrl-C and the unexpected
def test_a_ctrl_c_python_drops_in_a_callback_still_ends_the_verb_interrupted(capsys, monkeypatch):
    # Prepare: a verb during which Ctrl-C lands inside a weakref callback, where Python drops the KeyboardInterrupt
    # ("Exception ignored in ...") as it may inside importlib's module locks while a verb imports torch
    import weakref

    from cdcca import cli

    class Thing:
        pass

    ran_on = []

    def verb(args):
        thing = Thing()
        ref = weakref.ref(thing, lambda _: signal.raise_signal(signal.SIGINT))  # noqa: F841 (the callback needs it)
        del thing  # the callback runs, the signal's handler raises inside it, Python drops the exception
        ran_on.append(True)
        return {}

    monkeypatch.setitem(cli.HANDLERS, "info", verb)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh process has it
    try:
        # Execute
        code = cli.main(["info"])
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    # Assert: the verb ran on (the drop is real), then main says interrupted, once, with Python's own report held back
    err = capsys.readouterr().err
    assert ran_on == [True] and code == 130
    assert err == "cdcca info: interrupted\n"
    assert after is signal.default_int_handler  # main put Python's handler back


def test_a_verb_that_stops_on_ctrl_c_itself_is_not_called_interrupted(monkeypatch):
    import weakref

    from cdcca import cli

    class Thing:
        pass

    def verb(args):  # as `cdcca status` does: Ctrl-C is how it stops, here the second press after a dropped one
        thing = Thing()
        ref = weakref.ref(thing, lambda _: signal.raise_signal(signal.SIGINT))  # noqa: F841 (the callback needs it)
        del thing  # the first press, dropped by Python
        try:
            signal.raise_signal(signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            return {}
        raise AssertionError("Ctrl-C did not interrupt the verb")

    monkeypatch.setitem(cli.HANDLERS, "info", verb)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert cli.main(["info"]) == 0
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_start_up_is_one_line_and_exit_130():
    # Prepare: a process that signals once cdcca.cli is imported, then starts `info` (imports torch, transformers)
    code = (
        "import sys\nfrom cdcca.cli import main\nprint('ready', flush=True)\n"
        "sys.exit(main(['info', '--preset', 'test']))\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.3)  # inside the verb's imports (several seconds on a CPU runner)
    # Execute
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    # Assert: Python reports an interrupted process to its parent either as exit 130 or as death by SIGINT
    # (it re-raises SIGINT when a KeyboardInterrupt crossed C code during an import); a shell sees 130 both ways
    assert child.returncode in (130, -signal.SIGINT), err
    assert [line for line in err.splitlines() if line.strip()] == ["cdcca info: interrupted"]
    assert out == ""


def _failing_handler(args) -> dict:
    return {"ratio": 1 / len([])}  # a bug: ZeroDivisionError


def test_an_unexpected_error_is_one_line_exit_1_and_the_traceback_with_verbose(monkeypatch, capsys):
    from cdcca import cli

    monkeypatch.setitem(cli.HANDLERS, "info", _failing_handler)  # stands in for any bug inside a verb
    _one_error_line(["info"], capsys, "unexpected ZeroDivisionError", "run with --verbose for the traceback", code=1)
    root = logging.getLogger()
    level = root.level
    try:
        code, errors, _ = _run(["--verbose", "info"], capsys)
    finally:
        root.setLevel(level)  # --verbose set DEBUG logging for the process
    assert code == 1 and errors[0].startswith("Traceback") and "_failing_handler" in "\n".join(errors)


def test_a_file_that_cannot_be_read_is_not_called_unwritable(tmp_path, monkeypatch):
    import errno
    import os

    from cdcca.cli import describe_os_error

    key = tmp_path / "cloud-1.key"
    key.write_text("x")
    denied = PermissionError(errno.EACCES, "Permission denied", str(key))
    assert describe_os_error(denied).startswith(f"cannot write {key}")  # root: readable, so a write failed
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(key) and mode & os.R_OK
                        else real_access(path, mode))  # fmt: skip
    assert describe_os_error(denied) == f"cannot read {key}: Permission denied; check its permissions"
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(key) else real_access(path, mode))
    assert describe_os_error(denied) == (f"cannot read or write {key}: Permission denied; "
                                         "check its owner and permissions")  # fmt: skip


@pytest.mark.parametrize(("module", "code", "advice"), [
    ("pyrealsense2", 2, "a RealSense camera needs pyrealsense2, which is missing: pip install 'cdcca[edge]'"),
    ("cyclonedds.domain", 2, "a ROS 2 graph over DDS needs cyclonedds, which is missing: pip install 'cdcca[edge]'"),
    ("psycopg", 2, "this needs the cloud install (psycopg is missing): pip install 'cdcca[cloud]'"),
    ("no_such_module", 1, "unexpected ModuleNotFoundError"),
])  # fmt: skip
def test_a_missing_optional_package_names_the_extra_that_has_it(module, code, advice, capsys, monkeypatch):
    from cdcca import cli

    def missing(args):
        raise ModuleNotFoundError(f"No module named {module!r}", name=module)

    monkeypatch.setitem(cli.HANDLERS, "info", missing)
    _one_error_line(["info"], capsys, advice, code=code)


def test_a_missing_cyclonedds_on_the_cloud_names_the_cloud_extra(capsys, monkeypatch, tmp_path):
    from cdcca import cli

    def missing(args):
        raise ModuleNotFoundError("No module named 'cyclonedds'", name="cyclonedds")

    monkeypatch.setitem(cli.HANDLERS, "cloud", missing)
    _one_error_line(["cloud", "--dds", "--state", tmp_path / "state"], capsys,
                    "this needs the cloud install (cyclonedds is missing): pip install 'cdcca[cloud]'")  # fmt: skip


def test_status_on_an_endpoint_zenoh_refuses_is_one_line_without_its_source_paths(capsys):
    line = _one_error_line(["status", "--endpoint", "bogus", "--once", "1"], capsys,
                           "cannot open the link (bogus): invalid Zenoh setting", quiet=False)  # fmt: skip
    assert ".rs:" not in line and "/root/" not in line


def test_a_public_key_passed_as_the_signing_key_says_which_file_to_pass(tmp_path):
    from cdcca.envelope import KeyStoreError, Signer, generate_key

    _, public = generate_key(tmp_path, "cloud-1")
    with pytest.raises(KeyStoreError, match=r"cloud-1\.pub is not a PEM private key .*not its \.pub"):
        Signer.load(public)
