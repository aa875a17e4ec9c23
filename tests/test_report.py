"""``bench report`` from synthetic records, a matrix.json and a tiny cached protected set: no training."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.cli import main
from bench.core.components import ImageSet
from bench.core.registry import ConfigError
from bench.report.page import build_report
from bench.store.cache import Cache
from bench.store.keys import make_key
from tests.conftest import record_json

DATASET = "d" * 24
CWP_SPEC = {"name": "cwp", "version": 1, "params": {"size_fraction": 0.375}}


def record(protection: str, countermeasure: str, acc: float, *, ratio: float = 1.0, key: str | None = None,
           status: str = "ok", **extra) -> dict:
    """A record as ``bench.execute.stages.train_job`` writes it (accuracies in [0, 1])."""
    ok = status == "ok"
    curve = [min(acc, 0.1 + 0.2 * e) for e in range(5)]
    return {"cell": f"{protection}|{countermeasure}|{ratio}", "matrix": "tiny", "status": status, "dataset": "digits",
            "victim": "cnn", "recipe": "quick", "poison_ratio": ratio, "mix": "protected", "seed": 0,
            "protection": protection, "countermeasure": countermeasure, "countermeasure_reports": "final",
            "test_acc_final": acc if ok else None, "test_acc_best": max(curve) if ok else None, "best_epoch": 5,
            "train_acc": [min(1.0, 0.3 + 0.2 * e) for e in range(5)] if ok else None, "test_acc": curve if ok else None,
            "error": None if ok else "Traceback …\nRuntimeError: boom", "device": "cpu", "threads": 1,
            "precision": "fp32", "augment": "none", "versions": {"python": "3.11.2", "torch": "2.4.0"},
            "recipe_params": {"name": "quick", "epochs": 5, "lr": 0.1}, "seconds": {"load": 0.1, "train": 2.5},
            "protection_key": key, "purify_key": "p" * 24 if countermeasure == "jpeg" else None,
            "dataset_key": None, "finished_at": 1.0, **extra}


def write_run(results: Path, records: list[dict], ratios: list[float] = (1.0,)) -> None:
    run = results / "runs" / "tiny"
    run.mkdir(parents=True)
    saved = {"name": "tiny", "description": "tiny synthetic matrix", "source": "tiny.toml", "seeds": [0],
             "poison_ratio": list(ratios), "mix": ["protected"], "recipe": {"name": "quick"}, "exclude": [],
             "layout": {"rows": ["protection"], "columns": "countermeasure", "labels": {}, "summary": True},
             "reference": None,
             "axes": {"datasets": [{"label": "digits", "name": "digits", "params": {}}],
                      "protections": [{"label": p, "name": p, "params": {}} for p in ("clean", "cwp", "em")],
                      "countermeasures": [{"label": c, "name": c, "params": {}} for c in ("none", "jpeg")],
                      "victims": [{"label": "cnn", "name": "cnn", "params": {}}]}}
    (run / "matrix.json").write_text(json.dumps(saved))
    (run / "records.jsonl").write_text("".join(json.dumps(record_json(**r)) + "\n" for r in records))


def write_entry(folder: Path, images: np.ndarray, labels: np.ndarray, manifest: dict) -> None:
    """A cache entry as the stages write it (checksummed: `bench report` shows only entries that verify)."""
    Cache(folder.parent.parent).save(folder.parent.name, folder.name,
                                     ImageSet(torch.from_numpy(images), torch.from_numpy(labels), 10), manifest)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Records of clean / cwp / em × none / jpeg (one cell failed), a cached clean train set and cwp's protected
    set (em's is missing from the cache); cwp's records carry no dataset_key (older records)."""
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 256, (20, 3, 8, 8), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 2)
    protected = np.clip(clean.astype(int) + rng.integers(-8, 9, clean.shape), 0, 255).astype(np.uint8)
    key = make_key({"dataset": DATASET, "protection": CWP_SPEC, "seed": 0})
    cache = tmp_path / "cache"
    write_entry(cache / "dataset" / f"{DATASET}-train", clean, labels, {"split": "train"})
    write_entry(cache / "protected" / key, protected, labels, {"spec": CWP_SPEC, "seed": 0})
    records = [record("clean", "none", 0.9), record("clean", "jpeg", 0.8),
               record("cwp", "none", 0.1, key=key, car=0.9, gcr=0.2),
               record("cwp", "jpeg", 0.6, key=key, car=0.4, gcr=0.8),
               record("em", "none", 0.2, key="e" * 24, dataset_key=DATASET),
               record("em", "jpeg", 0.0, key="e" * 24, dataset_key=DATASET, status="error")]
    write_run(tmp_path, records)
    return tmp_path


def test_report_html_is_self_contained_with_tables_figures_and_environment(results, tmp_path):
    out = tmp_path / "report"
    paths = build_report(results, "tiny", out)
    assert {p.name for p in paths} >= {"report.html", "report.md"} and all(p.is_file() for p in paths)
    page = (out / "report.html").read_text()
    assert page.count("<table") >= 6  # final, best, protected stats, CAR, GCR, runs, versions, recipe, cells
    assert "digits × cnn — test accuracy (%, final), recipe quick" in page
    assert "90.00" in page and "error" in page and "RuntimeError: boom" in page  # a value, a failed cell
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2  # one curves figure (one table), one image grid (cwp; em is not cached)
    assert all(base64_png(i) for i in images)
    assert "protected/" + "e" * 24 + " is missing" in page  # em's entry: said on the page, not a failure
    assert "Environment and reproducibility" in page and "2.4.0" in page and "cpu" in page
    assert DATASET in page and "p" * 24 in page  # cache keys
    assert "CAR" in page and "GCR" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    assert "Accuracy against poison ratio" not in page  # a single ratio: no Fig. 5 polylines


def test_report_states_protected_image_statistics(results, tmp_path):
    build_report(results, "tiny", tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("|") and "cwp (seed 0" in line)
    linf, l2, psnr, ssim = (float(x) for x in row.split("|")[2:6])
    assert linf == pytest.approx(8.0) and 0 < l2 < 1 and 20 < psnr < 60 and 0 < ssim < 1


def test_markdown_references_png_files_that_exist(results, tmp_path):
    out = tmp_path / "report"
    build_report(results, "tiny", out)
    md = (out / "report.md").read_text()
    files = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert len(files) == 2 and all((out / f).is_file() and (out / f).read_bytes()[:4] == b"\x89PNG" for f in files)
    assert "| cwp" in md and "Environment and reproducibility" in md


def test_several_poison_ratios_give_fig5_polylines(tmp_path):
    records = [record(p, "none", acc, ratio=r) for p, accs in (("clean", (0.9, 0.9, 0.9)), ("cwp", (0.8, 0.5, 0.1)))
               for r, acc in zip((0.2, 0.6, 1.0), accs)]
    write_run(tmp_path, records, ratios=[0.2, 0.6, 1.0])
    build_report(tmp_path, "tiny", tmp_path / "report")
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Accuracy against poison ratio (ConfounderGAN Fig. 5)" in page
    assert "p=0.2" in page  # the leaderboard's ratio columns
    assert "Protected images" not in page and "CAR" not in page  # no protected set, no CAR records


def test_a_matrix_with_a_reference_shows_ours_paper_delta(results, tmp_path):
    saved_path = results / "runs" / "tiny" / "matrix.json"
    saved_path.write_text(json.dumps({**json.loads(saved_path.read_text()), "reference": "dh-table1"}))
    build_report(results, "tiny", tmp_path / "report")
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Against the paper (dh-table1)" in page and ">paper<" in page and ">Δ<" in page
    assert "none ours" in (tmp_path / "report" / "report.md").read_text()


def test_default_output_and_cli(results, capsys):
    assert main(["report", "--matrix", "tiny", "--results", str(results)]) == 0
    assert (results / "reports" / "tiny" / "report.html").is_file()
    assert "report.html" in capsys.readouterr().out


def test_no_records_says_to_run_the_matrix_first(tmp_path, capsys):
    with pytest.raises(ConfigError, match="bench run --matrix smoke"):
        build_report(tmp_path, "smoke")
    assert main(["report", "--matrix", "smoke", "--results", str(tmp_path)]) == 2
    assert "bench run --matrix smoke" in capsys.readouterr().err


def base64_png(text: str) -> bool:
    import base64

    return base64.b64decode(text)[:4] == b"\x89PNG"


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium) to render report.html")
def test_report_renders_in_headless_chromium(results, tmp_path):
    from PIL import Image

    build_report(results, "tiny", tmp_path / "report")
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1280,4000", (tmp_path / "report" / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (4000, 1280)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # text, tables and figures, not a blank page
