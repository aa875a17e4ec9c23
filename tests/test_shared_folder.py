"""A results folder two users share (group-writable, setgid, umask 002), and submitit's pickles kept where no
other user can write. The two-user test creates a throwaway user and group (root only) and removes them after."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from bench.core.registry import ConfigError
from bench.execute.cluster import default_submitit_folder, private_folder
from bench.store.cache import Cache, umask
from conftest import REPO, TINY

CAN_ADD_USERS = hasattr(os, "getuid") and os.getuid() == 0 and all(map(shutil.which, ("useradd", "groupadd", "runuser")))


def test_cache_entries_follow_the_umask(tmp_path):
    """Entries were 0700 (mkdtemp's mode): a second user of a shared folder crashed with PermissionError."""
    import torch

    from bench.core.components import ImageSet

    old = os.umask(0o002)
    try:
        assert umask() == 0o002
        Cache(tmp_path).save("dataset", "k", ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2).long(),
                                                      2), {})
    finally:
        os.umask(old)
    entry = tmp_path / "dataset" / "k"
    assert stat.S_IMODE(entry.stat().st_mode) == 0o775
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o664 for f in entry.iterdir())


@pytest.mark.skipif(not CAN_ADD_USERS, reason="needs root, useradd, groupadd and runuser")
def test_a_second_user_of_a_group_shared_results_folder_reuses_the_first_users_sets(tmp_path):
    tag = uuid.uuid4().hex[:6]
    group, user = f"benchg{tag}", f"benchu{tag}"
    shared = Path(tempfile.mkdtemp(prefix="bench-shared-"))
    try:
        subprocess.run(["groupadd", group], check=True)
        subprocess.run(["useradd", "-M", "-N", "-g", group, user], check=True)
        if subprocess.run(["runuser", "-u", user, "--", sys.executable, "-c", "import bench"], cwd=shared,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True).returncode:
            pytest.skip(f"{sys.executable} or {REPO} cannot be used by another user here (e.g. under a 0700 home)")
        shutil.chown(shared, group=group)
        shared.chmod(0o2775)
        results, matrix = shared / "results", shared / "m.toml"
        matrix.write_text(TINY.format(extra_countermeasures=""))
        matrix.chmod(0o644)
        env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(shared), "BENCH_PLUGINS": ""}
        base = [sys.executable, "-m", "bench", "run", "--matrix", str(matrix), "--results", str(results), "--jobs", "1"]
        first = subprocess.run(["sh", "-c", 'umask 002 && exec "$@"', "sh", *base], cwd=shared, env=env,
                               capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr[-1500:]
        # the second user retrains the cells (--force) on the first user's cached dataset and protected sets
        second = subprocess.run(["runuser", "-u", user, "--", "sh", "-c", 'umask 002 && exec "$@"', "sh", *base,
                                 "--force", "--only", "countermeasure=none"], cwd=shared, env=env,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr[-2500:]
        assert "2 trained" in second.stdout, second.stdout[-800:]
    finally:
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)
        shutil.rmtree(shared, ignore_errors=True)


def test_submitit_pickles_are_kept_out_of_the_results_folder(tmp_path, monkeypatch):
    """submitit's job and result pickles were in <results>/submitit: anyone who could write the results folder
    could make another user's run execute code."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_submitit_folder() == tmp_path / "cache" / "bench" / "submitit"
    folder = private_folder(default_submitit_folder())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode, where", [(0o777, "folder"), (0o775, "folder"), (0o777, "parent"), (0o1777, "folder")])
def test_a_submitit_folder_others_can_write_is_refused(tmp_path, mode, where):
    (tmp_path / "p" / "s").mkdir(parents=True)
    tmp_path.chmod(0o755)
    (tmp_path / "p").chmod(mode if where == "parent" else 0o755)
    (tmp_path / "p" / "s").chmod(mode if where == "folder" else 0o700)
    with pytest.raises(ConfigError, match="writable by other users.*--submitit-folder"):
        private_folder(tmp_path / "p" / "s")


def test_a_sticky_world_writable_folder_above_is_fine(tmp_path):
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp").chmod(0o1777)
    tmp_path.chmod(0o755)
    assert private_folder(tmp_path / "tmp" / "mine").is_dir()


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root to chown")
def test_a_submitit_folder_another_user_owns_is_refused(tmp_path):
    tmp_path.chmod(0o755)
    (tmp_path / "s").mkdir(mode=0o700)
    os.chown(tmp_path / "s", 65534, -1)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        private_folder(tmp_path / "s")
