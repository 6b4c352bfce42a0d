"""``cdcca`` help (issue 17, "CLI"): fast to build, defaults equal to the configs, examples, one model-folder name."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cdcca import cli
from cdcca.cli import build_parser, main
from cdcca.errors import CdccaError

ROOT = Path(__file__).resolve().parents[1]


def _help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


HELP_PAGES = [[], *([verb] for verb in cli.VERBS), *(["keys", a] for a in cli.KEY_ACTIONS),
              *(["bench", b] for b in cli.BENCH_KINDS)]  # fmt: skip


def test_building_the_parser_and_every_help_page_imports_no_heavy_module():
    # Execute: a fresh interpreter builds the parser and renders every help page
    pages = json.dumps(HELP_PAGES)
    code = (
        "import json, sys\n"
        "from cdcca.cli import build_parser, HEAVY_MODULES\n"
        f"for argv in json.loads({pages!r}):\n"
        "    try:\n"
        "        build_parser().parse_args([*argv, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(json.dumps(sorted(m for m in HEAVY_MODULES if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    # Assert: no torch, transformers, peft, bitsandbytes, onnxruntime or zenoh was imported
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_a_typo_answers_in_one_line_without_importing_torch():
    code = (
        "import sys\nfrom cdcca.cli import main\n"
        "try:\n    main(['edg'])\nexcept SystemExit as e:\n    print('exit', e.code)\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.split() == ["exit", "2", "False"]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "invalid choice: 'edg'" in errors[0] and "'edge'" in errors[0]


def test_the_defaults_shown_are_the_config_dataclasses_defaults():
    # Prepare: the configs each verb feeds (these imports may load torch; the parser does not)
    from cdcca.akd import AKDConfig
    from cdcca.benchmarks.adapt import AdaptBenchConfig
    from cdcca.benchmarks.uplink import UplinkBenchConfig
    from cdcca.demo import DemoConfig
    from cdcca.edge.app import ReplaySettings
    from cdcca.edge.runtime import EdgeConfig
    from cdcca.pretrain import PretrainConfig
    from cloud_trainer.service import CloudConfig

    parse = build_parser().parse_args
    cloud, edge = parse(["cloud"]), parse(["edge", "--source", "dir:x"])
    pretrain, demo = parse(["pretrain"]), parse(["demo"])
    akd, cloud_config, edge_config, replay = AKDConfig(), CloudConfig(), EdgeConfig(), ReplaySettings("dir:x")
    table = [  # (parsed value, dataclass value, what)
        *[(getattr(cloud, f), getattr(cloud_config, f), f"cloud --{f}") for f in cli.CLOUD_DEFAULTS],
        (cloud.flush_after, cloud_config.flush_after_s, "cloud --flush-after"),
        (cloud.metrics_address, cloud_config.metrics_address, "cloud --metrics-address"),
        (cloud.status_every, cloud_config.status_every_s, "cloud --status-every"),
        (cloud.comeback_after, cloud_config.comeback_after_s, "cloud --comeback-after"),
        (cloud.metrics_port, cloud_config.metrics_port, "cloud --metrics-port"),
        (cloud.adapter_cache, cloud_config.adapter_cache, "cloud --adapter-cache"),
        (cloud.worker_id, cloud_config.worker_id, "cloud --worker-id"),
        (cloud.lease, cloud_config.lease_s, "cloud --lease"),
        (edge.cloud_warn_after, edge_config.cloud_warn_after_s, "edge --cloud-warn-after"),
        (edge.metrics_addr, replay.metrics_addr, "edge --metrics-addr"),
        (edge.status_line, replay.status_line, "edge --status-line"),
        (edge.wait_updates, replay.wait_updates, "edge --wait-updates"),
        *[(getattr(cloud, f), getattr(akd, f), f"cloud --{f} (AKD)") for f in cli.AKD_DEFAULTS],
        *[(getattr(edge, f), getattr(edge_config, f), f"edge --{f}") for f in cli.EDGE_DEFAULTS],
        (edge.batch_size, replay.batch_size, "edge --batch-size (replay)"),
        (edge.rate, replay.speed, "edge --rate"),
        (edge.query_rate, replay.rate_hz, "edge --query-rate"),
        (edge.linger, replay.linger_s, "edge --linger"),
        *[(getattr(pretrain, f), PretrainConfig.__dataclass_fields__[f].default, f"pretrain --{f}")
          for f in cli.PRETRAIN_DEFAULTS],
        (pretrain.preset, PretrainConfig.__dataclass_fields__["preset"].default, "pretrain --preset"),
        (pretrain.precision, PretrainConfig.__dataclass_fields__["precision"].default, "pretrain --precision"),
        (demo.precision, PretrainConfig.__dataclass_fields__["precision"].default, "demo --precision"),
        *[(getattr(demo, f), DemoConfig.__dataclass_fields__[f].default, f"demo --{f}") for f in cli.DEMO_DEFAULTS],
        (parse(["bench", "uplink"]).images_per_domain, UplinkBenchConfig().images_per_domain, "bench uplink"),
        (tuple(parse(["bench", "adapt"]).seeds), AdaptBenchConfig.seeds, "bench adapt --seeds"),
        (parse(["bench", "adapt"]).stream_images, AdaptBenchConfig.stream_images, "bench adapt --stream-images"),
    ]  # fmt: skip
    # Assert
    mismatches = [what for parsed, expected, what in table if parsed != expected]
    assert mismatches == []


def test_the_names_the_parser_lists_are_the_registries():
    from cdcca.benchmarks.adapt import AdaptBenchConfig
    from cdcca.data.digits_shift import DOMAINS, TARGET_DOMAINS
    from cdcca.data.sample import TASKS
    from cdcca.dwc import CODECS
    from cdcca.models.presets import PRESETS
    from cdcca.transport import DEFAULT_ENDPOINT

    assert cli.PRESET_NAMES == tuple(sorted(PRESETS))
    # the help lists exactly the registered codecs (ecdq, the downlink bench's pick, was once missing from it)
    assert set(cli.CODEC_NAMES) == set(CODECS) and cli.CLOUD_DEFAULTS["codec"] in cli.CODEC_NAMES
    assert cli.DEFAULT_ENDPOINT == DEFAULT_ENDPOINT
    assert cli.BENCH_METHODS == AdaptBenchConfig.methods
    assert cli.DOMAIN_NAMES == tuple(DOMAINS) and list(cli.DOMAIN_NAMES[1:]) == list(TARGET_DOMAINS)
    assert build_parser().parse_args(["make-bag", "x"]).domains == list(TARGET_DOMAINS)
    assert cli.TASK_NAMES == TASKS


def test_the_top_help_lists_each_verb_once_and_points_at_verb_help(capsys):
    text = _help_text(capsys)
    for verb, line in cli.VERBS.items():
        assert text.count(f"  {verb:<10} {line}") == 1
        assert sum(line.split()[:1] == [verb] for line in text.splitlines()) == 1  # not argparse's listing too
    assert "`cdcca VERB --help`" in text
    assert all(len(line) <= 120 for line in text.splitlines())


@pytest.mark.parametrize("argv", HELP_PAGES[1:], ids=lambda argv: "-".join(argv))
def test_every_verb_and_action_has_an_example_and_shows_its_defaults(argv, capsys):
    text = _help_text(capsys, *argv)
    assert "example" in text and f"cdcca {' '.join(argv)}" in text.split("example")[-1]
    assert all(len(line) <= 120 for line in text.splitlines())
    if argv[0] not in ("keys", "bench") or len(argv) == 2:
        assert "--verbose" in text


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["cloud"], ["--round-size ROUND_SIZE", "(default: 64)", "(default: subspace)", "fp16, nf4, nf4-zstd"]),
        (["edge"], ["(default: 1024)", "{torch,onnx}", "(default: tcp/127.0.0.1:7447)", "{test,tiny}"]),
        (["pretrain"], ["(default: 1000)", "(default: 500)", "(default: 300)", "(default: 0)"]),
        (["keys", "trust"], ["--replace", "PUBFILE"]),
        (["bench", "adapt"], ["--methods", "source-only tent cotta", "(default: 0 1 2)"]),
    ],
)
def test_help_shows_defaults_and_choices(argv, shown, capsys):
    text = _help_text(capsys, *argv)
    missing = [s for s in shown if s not in " ".join(text.split())]
    assert missing == []


def test_keys_actions_have_their_own_options(capsys):
    trust, generate = _help_text(capsys, "keys", "trust"), _help_text(capsys, "keys", "generate")
    assert "--replace" in trust and "--key-id" not in trust
    assert "--key-id" in generate and "--replace" not in generate and "--store" not in generate


def test_version_comes_from_the_package(capsys):
    from importlib.metadata import version

    import cdcca

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"cdcca {version('cdcca')}"
    assert version("cdcca") == cdcca.__version__


@pytest.mark.parametrize("verb", ["edge", "cloud", "export", "bench uplink", "bench downlink", "bench adapt",
                                  "bench edge"])  # fmt: skip
def test_model_is_the_folder_everywhere_and_checkpoints_a_hidden_alias(verb, capsys):
    argv = [*verb.split(), *(["--source", "dir:x"] if verb == "edge" else [])]
    parse = build_parser().parse_args
    assert parse([*argv, "--model", "/a"]).checkpoints == Path("/a")
    assert parse([*argv, "--checkpoints", "/b"]).checkpoints == Path("/b")
    text = _help_text(capsys, *verb.split())
    assert "--model DIR" in text and "--checkpoints" not in text


def test_todays_command_lines_still_parse():
    parse = build_parser().parse_args
    for verb in ("pretrain", "demo"):  # the folder pretrain writes is the one the others read
        assert parse([verb, "--model", "m"]).out == parse([verb, "--out", "m"]).out == Path("m")
    trust = parse(["keys", "trust", "cloud-1.pub", "--store", "s", "--json", "r.json"])
    assert (trust.action, trust.target, trust.store, trust.json) == ("trust", "cloud-1.pub", Path("s"), Path("r.json"))
    revoke = parse(["keys", "revoke", "cloud-1", "--key", "k.key", "--out", "o.json"])
    assert (revoke.action, revoke.target, revoke.key, revoke.out) == (
        "revoke",
        "cloud-1",
        Path("k.key"),
        Path("o.json"),
    )
    bench = parse(["bench", "uplink", "--checkpoints", "ck", "--images-per-domain", "1", "--json", "u.json"])
    assert (bench.which, bench.checkpoints, bench.images_per_domain) == ("uplink", Path("ck"), 1)
    adapt = parse(["bench", "adapt", "--methods", "pl", "cdcca", "--seeds", "0", "--no-ablations"])
    assert (adapt.methods, adapt.seeds, adapt.no_ablations) == (["pl", "cdcca"], [0], True)
    assert parse(["--verbose", "info"]).verbose and parse(["info", "--verbose"]).verbose
    assert parse(["info"]).verbose is False


def test_eval_model_takes_a_pair_folder_a_checkpoint_folder_or_names(tmp_path):
    # Prepare: a pair folder and a single checkpoint folder (only their layout matters here)
    pair, single = tmp_path / "pair", tmp_path / "blip2"
    (pair / "student").mkdir(parents=True)
    single.mkdir()
    (single / "config.json").write_text("{}")
    parse = build_parser().parse_args
    # Execute / Assert
    assert cli._resolve_models(parse(["eval", "--model", str(pair)])) == {"teacher": pair / "teacher",
                                                                          "student": pair / "student"}  # fmt: skip
    assert cli._resolve_models(parse(["eval", "--model", str(single)])) == {str(single): single}
    assert cli._resolve_models(parse(["eval", "--checkpoints", str(pair), "--model", "student"])) == {
        "student": pair / "student"}  # fmt: skip
    other = tmp_path / "other"
    (other / "teacher").mkdir(parents=True)
    assert cli._resolve_models(parse(["eval", "--model", str(pair), str(other), str(single)])) == {
        f"{pair}/teacher": pair / "teacher", f"{pair}/student": pair / "student",
        f"{other}/teacher": other / "teacher", f"{other}/student": other / "student", str(single): single}  # fmt: skip
    with pytest.raises(CdccaError, match="no such folder"):  # a typo is not dropped in silence
        cli._resolve_models(parse(["eval", "--model", str(single), str(tmp_path / "singel")]))
    with pytest.raises(CdccaError, match="not a checkpoint folder"):
        cli._resolve_models(parse(["eval", "--model", str(tmp_path)]))


def _table_lines(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_the_bench_and_demo_tables_fit_120_columns(capsys):
    # Prepare: the committed benchmark reports, printed as the verbs print them
    from cdcca.benchmarks.edge import COLUMNS
    from cdcca.demo import _table
    from cdcca.report import format_table

    results = ROOT / "bench" / "results"
    reports = {name: json.loads((results / f"{name}.json").read_text()) for name in ("adapt", "downlink", "demo",
                                                                                      "edge")}  # fmt: skip
    # Execute
    cli._print_adapt_tables(reports["adapt"])
    cli._print_downlink_tables(reports["downlink"])
    print(_table(reports["demo"]["rounds"]))
    print(format_table(reports["edge"]["rows"], COLUMNS))
    lines = _table_lines(capsys)
    # Assert: every line fits; nothing was left out or cut for these reports
    assert len(lines) > 40 and max(len(line) for line in lines) <= 120
    assert not any("more columns in the JSON report" in line or line.endswith("...") for line in lines)
    assert any(line.startswith("sparse-sign-ref") for line in lines)


def test_format_table_wraps_then_cuts_then_drops_columns():
    from cdcca.report import format_table

    rows = [{"student_acc_before": 65.5, "note": "x" * 300, **{f"column_{i}": i for i in range(30)}}]
    # wrapped headers keep every column when they suffice
    narrow = format_table(rows, ["student_acc_before", "column_1"], max_width=20).splitlines()
    assert narrow == ["student_    column_1", "acc_before", "----------  --------", "65.5               1"]
    # a long text cell is cut with "..."
    cut = format_table(rows, ["note", "column_1"]).splitlines()
    assert max(map(len, cut)) <= 120 and cut[-1].rstrip().endswith("1") and "..." in cut[-1]
    # too many columns: the last ones are left out and named
    dropped = format_table(rows, [f"column_{i}" for i in range(30)], max_width=60).splitlines()
    assert max(map(len, dropped)) <= 60 and dropped[-1].startswith("(") and "column_29" not in dropped[0]


def test_the_robot_launch_file_takes_model_and_still_model_path():
    path = ROOT / "ros2_ws" / "src" / "cdcca_edge" / "launch" / "robot.launch.py"
    tree = ast.parse(path.read_text())
    table = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "ARGUMENTS")
    names = [ast.literal_eval(row.elts[0]) for row in table.elts]
    assert "model" in names and "model_path" in names
    source = path.read_text()
    assert "'checkpoints': ParameterValue(ModelFolder()" in source
    assert "LaunchConfiguration('model').perform(context)" in source


def test_both_commands_take_both_spellings_of_the_metrics_address():
    """`edge` spelled it --metrics-addr and `cloud` --metrics-address; a script written for one works on the other."""
    from cdcca.cli import build_parser

    parse = build_parser().parse_args
    for spelling in ("--metrics-address", "--metrics-addr"):
        assert parse(["edge", "--source", "dir:x", spelling, "127.0.0.1"]).metrics_addr == "127.0.0.1"
        assert parse(["cloud", spelling, "0.0.0.0"]).metrics_address == "0.0.0.0"
