"""`python -m minidalle check-gpu`: its dry run measures every phase on the CPU, a phase over its limit is
recorded as timed out while the later ones still run, and the folder rules hold (minidalle/bench/gpu_check.py)."""

import json

import pytest
import torch

from minidalle.bench import gpu_check
from minidalle.cli.main import main


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One `check-gpu --dry-run` (about 40 s on 2 cores), read by every test that only reads its report."""
    out = tmp_path_factory.mktemp("check-gpu") / "report"
    assert main(["check-gpu", "--dry-run", "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text(encoding="utf-8"))


def _positive(*values):
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)


def test_the_dry_run_finishes_every_phase_and_says_it_is_a_dry_run(dry_run):
    out, report = dry_run
    assert report["dry_run"] and report["complete"] and report["finished_utc"]
    assert list(report["phases"]) == list(gpu_check.PHASES)
    assert {name: e["status"] for name, e in report["phases"].items()} == {name: "ok" for name in gpu_check.PHASES}
    for name, e in report["phases"].items():
        assert _positive(e["seconds"], e["limit_s"]) and e["seconds"] < e["limit_s"], name
        assert (out / e["log"]).is_file() and e["log"] in e["files"]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "**Dry run**" in md and all(f"## {name}" in md for name in gpu_check.PHASES)
    kept = {p.name for p in out.iterdir()}
    assert {"report.json", "report.md", "demo-samples.png", "demo-report.md"} <= kept
    assert not [n for n in kept if n.startswith(".tmp-")], "the phases' scratch folder is removed at the end"


def test_versions_and_train_step_are_measured(dry_run):
    _, report = dry_run
    v, t = report["phases"]["versions"], report["phases"]["train_step"]
    assert v["torch"] == torch.__version__ and v["device"] == "cpu" and v["flex_attention"] in (True, False)
    assert v["peak_bf16_flops"] is None
    assert _positive(t["tokens_per_step"], t["flops_per_token"]["total"])
    for impl in ("flex", "sdpa"):
        assert _positive(t[impl]["ms_per_step"], t[impl]["tokens_per_s"], t[impl]["last_loss"])
        assert t[impl]["mfu"] is None and t[impl]["attn_used"] == "sdpa"  # no known CPU peak; no flex backward on CPU
    assert "no CPU backward" in t["flex"]["attn_reason"] and _positive(t["flex_speedup"])


def test_resume_host_syncs_sampler_attention_and_demo_are_measured(dry_run):
    _, report = dry_run
    p = report["phases"]
    r = p["resume"]
    assert r["bit_exact"] is True and r["weights_bit_exact"] is True and r["first_differing_step"] is None
    assert r["resumed_from"] == r["stopped_at"] and len(r["losses_resumed"]) == r["steps"]
    assert _positive(*r["losses_straight"])
    s = p["host_syncs"]
    assert _positive(s["updates"], s["per_update"])
    assert sum(s["by_kind_per_update"].values()) == pytest.approx(s["per_update"], abs=0.01)
    batches = p["sampler"]["batches"]
    assert set(batches) == {str(b) for b in gpu_check.DRY.sampler_batches}
    assert all(_positive(b["eager"]["images_per_s"], b["eager"]["seconds_per_call"]) for b in batches.values())
    compiled = batches[str(gpu_check.DRY.compiled_batches[0])]["compiled"]
    assert _positive(compiled["images_per_s"], compiled["first_call_s"], compiled["unique_graphs"],
                     compiled["frames_total"])
    assert compiled["frames_while_timed"] == 0 and compiled["cudagraph_skips"] == 0  # no recompile; no graphs on CPU
    a = p["attention"]
    assert _positive(*[v for k, v in a["forward"].items() if "_over_" in k])
    assert _positive(*[a["forward_backward"][m]["sdpa_mask_ms"] for m in ("row", "colT")])
    d = p["demo"]
    assert _positive(d["wall_minutes"], d["n_prompts"]) and set(d["splits"]) == {"val", "heldout"}
    assert all(isinstance(v, (int, float)) for split in d["splits"].values() for v in split.values())
    assert d["splits"]["val"] and d["stage_seconds"]


def test_a_phase_over_its_limit_is_timed_out_and_the_later_phases_still_run(tmp_path):
    out = tmp_path / "out"
    quiet = {"say": lambda line: None}
    report = gpu_check.check_gpu(out, dry_run=True, phases=["versions", "train_step", "host_syncs"],
                                 limits={"train_step": 0.3}, **quiet)
    statuses = {name: e["status"] for name, e in report["phases"].items()}
    assert statuses == {"versions": "ok", "train_step": "timed out", "host_syncs": "ok"}
    cut = report["phases"]["train_step"]
    assert "limit" in cut["error"] and "\n" not in cut["error"] and cut["limit_s"] == 0.3
    assert json.loads((out / "report.json").read_text())["phases"]["train_step"]["status"] == "timed out"
    assert "**timed out**" in (out / "report.md").read_text()
    # Run again into the same folder: its own earlier files are replaced, and only those
    again = gpu_check.check_gpu(out, dry_run=True, phases=["versions"], **quiet)
    assert list(again["phases"]) == ["versions"] and not (out / "phase-train_step.log").exists()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(gpu_check.MinidalleError, match="notes.txt"):
        gpu_check.check_gpu(out, dry_run=True, phases=["versions"], **quiet)
    assert (out / "notes.txt").read_text() == "mine" and (out / "report.json").is_file()


def test_a_folder_with_someone_else_s_files_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["check-gpu", "--dry-run", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "notes.txt" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # not even a lock file


def test_without_cuda_and_without_dry_run_it_refuses_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    assert main(["check-gpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device is visible" in err and "--dry-run" in err
    assert not out.exists()


def test_peaks_and_limits_are_looked_up_not_guessed():
    assert gpu_check.peak_bf16("NVIDIA H100 PCIe")[0] == 756e12
    assert gpu_check.peak_bf16("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert gpu_check.peak_bf16("NVIDIA L40S")[0] != gpu_check.peak_bf16("NVIDIA L4")[0]
    assert gpu_check.peak_bf16("NVIDIA GeForce GTX 1080") == (None, None) and gpu_check.peak_bf16("cpu") == (None, None)
    assert sum(gpu_check.SHARES.values()) == pytest.approx(1.0) and set(gpu_check.SHARES) == set(gpu_check.PHASES)
    names = list(gpu_check.PHASES)
    assert gpu_check.phase_limit(names[0], 480.0, names) == pytest.approx(480.0 * gpu_check.SHARES[names[0]])
    assert gpu_check.phase_limit("demo", 100.0, ["demo"]) == pytest.approx(100.0)  # the last gets all that is left
