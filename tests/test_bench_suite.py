"""Tests for minidalle.bench.suite: the plumbing of `bench all`, with every benchmark replaced by a fake.

The fakes return figures drawn at random for each test, so a summary that shows them got them from
the benchmark's result, and targets are judged on those numbers, not on values written here.
"""

import json
import random
import socket
from argparse import Namespace
from pathlib import Path

import pytest

from minidalle.bench import attention as attention_bench, suite as bench_all, bpe as bpe_bench, sampling as sampling_bench
from minidalle.stages import report as reporting
from minidalle.bench import dvae as dvae_bench, judge as judge_bench
from minidalle.cli.main import main
from minidalle.config import get_config
from minidalle.errors import CheckpointError, ConfigError, DataError


def _args(out, **kw) -> Namespace:
    """What the CLI's parser gives cmd_bench for `bench all` (its defaults), with kw on top."""
    base = dict(what="all", out=str(out), run=str(out / "no-run"), skip=None, n=None, mib=10.0,
                no_compile=False, json=True, preset="toy")
    return Namespace(**{**base, **kw})


class Fakes:
    """The five benchmarks and evaluate_run, faked: each records its call and returns random figures."""

    def __init__(self, monkeypatch, rng: random.Random):
        self.calls, self.rng, self.raises = [], rng, {}
        u = lambda: round(rng.uniform(0.05, 0.95), 3)  # noqa: E731
        split = lambda: {"val": {"overall": u()}, "heldout": {"overall": u()}}  # noqa: E731
        conds = ("clean", "degraded", "heavy")
        self.results = {
            "judge": {**{c: split() for c in conds}, "rejects": {c: split() for c in conds},
                      "ms_per_image": u()},
            "dvae": {**{s: {"ratio": u(), "psnr": 10 + u(), "reconstruction": {"overall": u()}}
                        for s in ("val", "heldout")},
                     "perplexity_fraction": u(), "dead_codes": rng.randint(0, 9), "steps": rng.randint(10, 99),
                     "train_seconds": u(), "encode_images_per_s": 100 + u()},
            "bpe": {"train_ratio_vs_hf": rng.choice([5.5, 31.5]), "speedup_vs_naive": rng.choice([3.5, 25.5]),
                    "encode_ratio_vs_tiktoken": u(), "train_seconds": u(), "encode_captions_per_s": 1000 + u()},
            "attention": {"targets": {"train_mask_over_causal_32": {"target": "<= 1.7", "value": u(),
                                                                    "met": rng.choice([True, False])}}},
            "sampling": {"targets": {"kv_speedup_toy_b1": {"target": ">= 5.0", "value": u(), "met": False},
                                     "roofline_fraction": {"target": ">= 0.4", "value": u(), "met": None,
                                                           "note": "not judged: a small model"}}},
        }
        self.quality = {"val_all_best16": u(), "val_all_single": u(), "heldout_all_best16": u(),
                        "heldout_all_single": u(), "val_gain": u(), "n_prompts": rng.randint(2, 9)}
        for module, name, key in ((judge_bench, "benchmark", "judge"), (dvae_bench, "benchmark_dvae", "dvae"),
                                  (bpe_bench, "benchmark_bpe", "bpe"),
                                  (attention_bench, "benchmark_attention", "attention"),
                                  (sampling_bench, "benchmark_sampling", "sampling")):
            monkeypatch.setattr(module, name, self._fake(key))
        for module, name in ((judge_bench, "format_benchmark"), (dvae_bench, "format_dvae_benchmark"),
                             (bpe_bench, "format_bpe_benchmark"), (attention_bench, "format_attention_benchmark"),
                             (sampling_bench, "format_sampling_benchmark")):
            monkeypatch.setattr(module, name, lambda r: "a text report")
        monkeypatch.setattr(reporting, "evaluate_run", self._fake_eval)

    def _fake(self, key):
        def bench(*args, **kwargs):
            self.calls.append((key, args, kwargs))
            if key in self.raises:
                raise self.raises[key]
            return self.results[key]
        return bench

    def _fake_eval(self, cfg, run, **kwargs):
        self.calls.append(("quality", (cfg, run), kwargs))
        if "quality" in self.raises:
            raise self.raises["quality"]
        return self.quality

    def names(self):
        return [c[0] for c in self.calls]


@pytest.fixture
def fakes(monkeypatch, request):
    return Fakes(monkeypatch, random.Random(request.node.name))


def _read(out):
    return json.loads((out / "summary.json").read_text()), (out / "summary.md").read_text()


def _value(summary, step, key):
    entry = summary["quality"] if step == "quality" else summary["benchmarks"][step]
    return {r["key"]: r for r in entry["figures"]}[key]


def test_summary_holds_every_figure_and_the_machine(tmp_path, fakes):
    run = tmp_path / "run"
    run.mkdir()
    summary = bench_all.bench_all(_args(tmp_path, run=str(run)), get_config("toy", smoke=False))
    assert fakes.names() == list(bench_all.STEPS)
    on_disk, md = _read(tmp_path)
    assert on_disk["complete"] and on_disk["benchmarks"] == json.loads(json.dumps(summary["benchmarks"]))
    r = fakes.results
    assert _value(on_disk, "judge", "heavy.heldout.overall")["value"] == r["judge"]["heavy"]["heldout"]["overall"]
    assert _value(on_disk, "dvae", "val.ratio")["value"] == r["dvae"]["val"]["ratio"]
    for key, op, bound in bench_all.bpe_targets():  # bench bpe's targets, judged here on its figures
        row = _value(on_disk, "bpe", key)
        value = r["bpe"][key]
        assert row["value"] == value and row["met"] == (value <= bound if op == "<=" else value >= bound)
    att = r["attention"]["targets"]["train_mask_over_causal_32"]
    assert _value(on_disk, "attention", "train_mask_over_causal_32")["met"] is att["met"]
    for step in bench_all.BENCHMARKS:
        assert on_disk["benchmarks"][step]["status"] == "ok" and on_disk["benchmarks"][step]["seconds"] >= 0
        assert f"## {step} (ok," in md
    for key, op, bound in bench_all.QUALITY_TARGETS:  # judged on the toy preset
        value = fakes.quality[key]
        assert _value(on_disk, "quality", key)["met"] == (value >= bound)
    assert bench_all.fmt_value(fakes.quality["val_gain"]) in md
    assert "MISSED" in md  # sampling's kv target is missed in every draw
    m = on_disk["machine"]
    assert m["cpus"] >= 1 and m["torch_threads"] >= 1 and m["python"] in md and m["platform"] in md
    assert "## machine" in md and "UTC" in m["utc"]
    host = socket.gethostname()
    assert len(host) < 4 or host not in md + json.dumps(on_disk)
    assert not list(tmp_path.glob("*.tmp"))
    assert "Made by `python -m minidalle bench all --preset toy" in md


def test_benchmarks_get_their_own_defaults_and_the_pass_through_flags(tmp_path, fakes):
    bench_all.bench_all(_args(tmp_path, no_compile=True, mib=2.5, skip="quality"), get_config("smoke"))
    kwargs = {name: kw for name, _, kw in fakes.calls}
    assert kwargs["sampling"]["compile"] is False and kwargs["bpe"]["mib"] == 2.5
    assert "n" not in kwargs["judge"] and "n_eval" not in kwargs["dvae"] and "n_captions" not in kwargs["bpe"]
    dvae_out = [a for name, a, _ in fakes.calls if name == "dvae"][0][1]
    assert str(tmp_path) not in str(dvae_out)  # a temporary folder of its own, not the summary's


def test_a_failing_benchmark_is_recorded_and_the_others_still_run(tmp_path, fakes):
    fakes.raises["dvae"] = RuntimeError("the dVAE diverged\nsecond line of detail")
    summary = bench_all.bench_all(_args(tmp_path), get_config("smoke"))
    assert fakes.names() == list(bench_all.BENCHMARKS)  # every later one ran (no run folder: no quality call)
    dvae = summary["benchmarks"]["dvae"]
    assert dvae["status"] == "failed" and dvae["error"] == "RuntimeError: the dVAE diverged"
    assert "second line" in dvae["traceback"]
    assert all(summary["benchmarks"][n]["status"] == "ok" for n in bench_all.BENCHMARKS if n != "dvae")
    _, md = _read(tmp_path)
    assert "**FAILED: dvae**" in md and "`RuntimeError: the dVAE diverged`" in md


def test_skip_leaves_steps_out_and_an_unknown_name_is_refused_first(tmp_path, fakes):
    (tmp_path / "run").mkdir()
    bench_all.bench_all(_args(tmp_path, skip="dvae, sampling", run=str(tmp_path / "run")), get_config("smoke"))
    assert fakes.names() == ["judge", "bpe", "attention", "quality"]
    summary, md = _read(tmp_path)
    assert summary["benchmarks"]["dvae"]["status"] == "skipped" and "## dvae" not in md

    fakes.calls.clear()
    out = tmp_path / "refused"
    with pytest.raises(ConfigError, match=r"--skip.*'dave'.*judge, dvae, bpe, attention, sampling, quality"):
        bench_all.bench_all(_args(out, skip="judge,dave"), get_config("smoke"))
    with pytest.raises(ConfigError, match="--n"):
        bench_all.bench_all(_args(out, n=5), get_config("smoke"))
    assert fakes.calls == [] and not out.exists()


def test_an_interrupt_keeps_what_was_measured(tmp_path, fakes, monkeypatch):
    seen = {}

    def dvae_killed(*args, **kwargs):  # what a process killed here (no chance to clean up) leaves on disk
        seen["summary"], seen["md"] = _read(tmp_path)
        fakes.calls.append(("dvae", args, kwargs))
        raise KeyboardInterrupt

    monkeypatch.setattr(dvae_bench, "benchmark_dvae", dvae_killed)
    with pytest.raises(KeyboardInterrupt):
        bench_all.bench_all(_args(tmp_path), get_config("smoke"))
    assert fakes.names() == ["judge", "dvae"]
    before = seen["summary"]["benchmarks"]
    assert before["judge"]["status"] == "ok" and before["judge"]["result"] == fakes.results["judge"]
    assert before["dvae"]["status"] == "running" and "## judge (ok," in seen["md"]
    summary, md = _read(tmp_path)
    judged = summary["benchmarks"]["judge"]
    assert judged["status"] == "ok" and judged["result"] == fakes.results["judge"]
    assert summary["benchmarks"]["dvae"]["status"] == "interrupted" and not summary["complete"]
    assert summary["benchmarks"]["bpe"]["status"] == "pending" and "Partial summary" in md


def test_quality_not_measured_without_a_finished_run(tmp_path, fakes):
    summary = bench_all.bench_all(_args(tmp_path, skip="judge,dvae,bpe,attention,sampling"), get_config("smoke"))
    q = summary["quality"]
    assert q["status"] == "not measured" and "no-run" in q["error"] and fakes.calls == []
    _, md = _read(tmp_path)
    assert "Not measured" in md and f"`python -m minidalle demo --preset smoke --out {tmp_path / 'no-run'}`" in md

    # A folder that holds no finished pipeline: evaluate_run's CheckpointError, with its message.
    fakes.raises["quality"] = CheckpointError("runs/x/clip holds no checkpoint")
    (tmp_path / "half").mkdir()
    q = bench_all.quality_step(get_config("toy", smoke=False), tmp_path / "half", progress=False)
    assert q["status"] == "not measured" and q["error"] == "runs/x/clip holds no checkpoint"
    assert bench_all.make_command(get_config("toy", smoke=False), Path("runs/demo-toy")) == "make demo"

    fakes.raises["quality"] = DataError("the judge reads ShapesWorld images only")
    q = bench_all.quality_step(get_config("toy", smoke=False), tmp_path / "half", progress=False)
    assert q["status"] == "not measured" and "Make a finished run" not in "\n".join(bench_all.quality_body(q))
    fakes.raises["quality"] = RuntimeError("out of memory")
    q = bench_all.quality_step(get_config("toy", smoke=False), tmp_path / "half", progress=False)
    assert q["status"] == "failed" and q["error"] == "RuntimeError: out of memory"


def test_quality_targets_are_judged_on_the_toy_preset_only(fakes):
    rows = bench_all.quality_figures(fakes.quality, "smoke")
    assert all(r["met"] is None for r in rows) and rows[-1]["value"] == fakes.quality["n_prompts"]
    fakes.quality["val_gain"] = 0.1
    rows = {r["key"]: r for r in bench_all.quality_figures(fakes.quality, "toy")}
    assert rows["val_gain"]["met"] is False and rows["val_gain"]["target"] == ">= 0.2"


def test_cli_bench_all_prints_json_and_exits_0(tmp_path, fakes, capsys):
    fakes.raises["bpe"] = ValueError("no tiktoken here")
    argv = ["bench", "all", "--preset", "smoke", "--out", str(tmp_path), "--run", str(tmp_path / "none"),
            "--skip", "dvae", "--no-compile", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    assert result["benchmarks"]["bpe"]["status"] == "failed" and result["benchmarks"]["judge"]["status"] == "ok"
    assert result["quality"]["status"] == "not measured" and result["complete"]
    assert "--skip dvae --no-compile" in result["command"] and (tmp_path / "summary.md").is_file()
    assert [kw["compile"] for name, _, kw in fakes.calls if name == "sampling"] == [False]


def test_cli_progress_lines_and_refusals(tmp_path, fakes, capsys):
    argv = ["bench", "all", "--preset", "smoke", "--out", str(tmp_path), "--skip", "dvae,bpe,attention,sampling"]
    assert main(argv + ["--run", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert "[bench all] 1/2 judge ...\n" in out and "[bench all] 2/2 quality not measured (no run folder" in out
    assert main(["bench", "all", "--skip", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "--skip" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["bench", "judge", "--skip", "dvae"]) == 2
    assert "bench all" in capsys.readouterr().err
    assert fakes.names() == ["judge"]
