"""``bench selfcheck``: the table, its files and exit status; a broken component fails it; the whole quick run."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench.core.components import VICTIMS
from bench.core.registry import ConfigError
from bench.execute.selfcheck import SECTIONS, add_parser, cmd_selfcheck

REPO = Path(__file__).resolve().parent.parent
CALL = textwrap.dedent("""\
    import argparse, sys
    from bench.execute.selfcheck import add_parser, cmd_selfcheck
    commands = argparse.ArgumentParser().add_subparsers(dest="command")
    add_parser(commands)
    sys.exit(cmd_selfcheck(commands.choices["selfcheck"].parse_args(sys.argv[1:])))
    """)
BROKEN = textwrap.dedent('''\
    from bench.api import VICTIMS, Victim

    @VICTIMS.register("selfcheck_broken")
    class Broken(Victim):
        """A victim that cannot be built."""

        def build(self, num_classes, in_channels, image_size):
            raise RuntimeError("deliberately broken victim")
    ''')


def parse(*argv: str) -> argparse.Namespace:
    commands = argparse.ArgumentParser().add_subparsers(dest="command")
    add_parser(commands)
    return commands.choices["selfcheck"].parse_args(list(argv))


def only(*sections: str) -> str:
    return ",".join(s for s in SECTIONS if s not in sections)


def saved(out: Path) -> dict[tuple[str, str], dict]:
    results = json.loads((out / "selfcheck-cpu.json").read_text())["results"]
    return {(r["section"], r["check"]): r for r in results}


def test_a_subset_passes_and_writes_one_table(tmp_path, capsys):
    out = tmp_path / "out"
    assert cmd_selfcheck(parse("--device", "cpu", "--quick", "--skip", only("env", "hooks", "loop"), "--out",
                               str(out))) == 0
    results = saved(out)
    assert {section for section, _ in results} == {"env", "hooks", "loop"}
    assert results["hooks", "mixup"]["status"] == "ok" and results["hooks", "mixup"]["seconds"] > 0
    assert results["loop", "host syncs per step"] == {**results["loop", "host syncs per step"], "status": "skipped",
                                                      "info": "needs CUDA"}
    table = (out / "selfcheck-cpu.md").read_text()
    assert table.startswith("| section | check | status | s | info |") and "| hooks | mixup | ok |" in table
    assert table in capsys.readouterr().out


def test_unknown_section_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="sections are"):
        cmd_selfcheck(parse("--device", "cpu", "--skip", "protect,gpus", "--out", str(tmp_path)))


def test_a_broken_component_fails_the_check_and_exits_1(tmp_path):
    (tmp_path / "broken.py").write_text(BROKEN)
    env = {**os.environ, "PYTHONPATH": str(REPO), "BENCH_PLUGINS": str(tmp_path / "broken.py")}
    proc = subprocess.run([sys.executable, "-c", CALL, "--device", "cpu", "--quick", "--skip", only("victims"),
                           "--out", str(tmp_path / "out")], check=False, capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    results = saved(tmp_path / "out")
    broken = results["victims", "selfcheck_broken"]
    assert broken["status"] == "FAIL" and "deliberately broken victim" in broken["info"]
    assert all(results["victims", name]["status"] == "ok" for name in VICTIMS.names()), results
    assert "| victims | selfcheck_broken | FAIL |" in proc.stdout


@pytest.mark.slow  # about 2.5 minutes on 2 cores
def test_the_quick_selfcheck_passes_on_the_cpu(tmp_path):
    start = time.perf_counter()
    assert cmd_selfcheck(parse("--device", "cpu", "--quick", "--out", str(tmp_path))) == 0
    assert time.perf_counter() - start < 300
    results = saved(tmp_path)
    assert {section for section, _ in results} == set(SECTIONS)
    assert results["faults", "worker death (SIGKILL)"]["status"] == "ok"
    assert results["faults", "CUDA device-side assert"]["status"] == "skipped"
    assert "0 pixels differ from CPU" in results["protect", "cwn"]["info"]
