"""The scale planner: properties its memory, FLOPs and time estimates must have, and its command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from minidalle.cli.main import main
from minidalle.config import get_config
from minidalle.errors import ConfigError
from minidalle.scale.plan import STRATEGIES, plan, plan_table
from minidalle.scale.plan import describe

REPO = Path(__file__).resolve().parents[1]
STATES = ("weights", "gradients", "optimizer")


@pytest.fixture(scope="module")
def paper():
    return get_config("paper", smoke=False)


@pytest.fixture(scope="module")
def toy():
    return get_config("toy", smoke=False)


def states(row: dict) -> float:
    return sum(row[k] for k in STATES)


def test_parameters_are_the_models_own_count(toy, paper):
    for cfg in (toy, paper):
        res = plan(cfg, 8, 80)
        assert res["params"] == describe(cfg)["transformer_params"]
        assert res["params"] == cfg.model.n_layer * res["block_params"] + res["rest_params"]
        assert 0 < res["rest_params"] < res["params"]


def test_flops_are_about_six_per_parameter_per_token(paper):
    """An estimate made another way: 6 N per token (the attention and embeddings move it by a few percent)."""
    res = plan(paper, 1024, 16, batch=1024, steps=430_000)
    tokens = res["sequence_len"] * 1024 * 430_000
    assert res["total_flops"] == pytest.approx(6 * res["params"] * tokens, rel=0.05)
    assert res["flops_per_step"] * 430_000 == pytest.approx(res["total_flops"])


def test_defaults_come_from_the_preset(toy):
    res = plan(toy, 4, 16)
    assert res["global_batch"] == 4 * toy.train.batch_size and res["micro_batch"] == toy.train.batch_size
    assert res["steps"] == toy.train.max_steps
    res = plan(toy, 4, 16, batch=8, steps=10)
    assert (res["global_batch"], res["micro_batch"], res["steps"]) == (8, 2, 10)


def test_fsdp_model_state_shrinks_as_one_over_gpus_and_ddp_does_not(paper):
    by_n = {n: plan(paper, n, 80)["memory"] for n in (8, 64, 512)}
    fsdp = {n: states(m["fsdp"]) for n, m in by_n.items()}
    assert states(by_n[8]["ddp"]) == states(by_n[64]["ddp"]) == states(by_n[512]["ddp"])
    assert fsdp[8] > fsdp[64] > fsdp[512]
    # S / N + G (G: the one unit gathered, which does not shrink): the differences show the 1/N
    assert (fsdp[8] - fsdp[64]) / (fsdp[64] - fsdp[512]) == pytest.approx(8)
    sharded = (fsdp[8] - fsdp[64]) / (1 / 8 - 1 / 64)
    gathered = fsdp[8] - sharded / 8
    unsharded = states(by_n[8]["ddp"])
    assert 0.5 * unsharded < sharded < unsharded  # the bf16 copy is not sharded, only gathered
    assert 0 < gathered < unsharded / paper.model.n_layer  # about one layer's worth
    assert unsharded * 2 ** 30 >= 16 * describe(paper)["transformer_params"]  # >= 16 bytes a parameter


def test_ddp_memory_per_gpu_does_not_depend_on_the_number_of_gpus(toy):
    totals = {n: plan(toy, n, 16)["memory"]["ddp"]["total"] for n in (1, 8, 64)}  # same per-GPU batch
    assert len(set(totals.values())) == 1, totals
    # a fixed global batch spread over more GPUs: each holds fewer samples' activations
    few, many = plan(toy, 2, 16, batch=64)["memory"]["ddp"], plan(toy, 32, 16, batch=64)["memory"]["ddp"]
    assert many["activations"] < few["activations"] and states(many) == states(few)


def test_checkpointing_stores_fewer_activations(toy, paper):
    for cfg in (toy, paper):
        mem = plan(cfg, 8, 80)["memory"]
        for sharding in ("ddp", "fsdp"):
            assert mem[f"{sharding}_ckpt"]["activations"] < mem[sharding]["activations"]
            assert states(mem[f"{sharding}_ckpt"]) == states(mem[sharding])


def test_activations_grow_with_the_micro_batch_and_lose_the_scores_without_them(paper):
    one, two = plan(paper, 64, 80, batch=64), plan(paper, 64, 80, batch=128)
    for key in STRATEGIES:
        assert two["memory"][key]["activations"] == pytest.approx(2 * one["memory"][key]["activations"])
    dense_kernel, no_scores = plan(paper, 64, 80, batch=64), plan(paper, 64, 80, batch=64, scores=False)
    assert no_scores["memory"]["fsdp"]["activations"] < dense_kernel["memory"]["fsdp"]["activations"]
    # the mask density scales the scores: a sparser mask stores less
    sparser = get_config("paper", {"model.conv_kernel": 3}, smoke=False)
    assert describe(sparser)["mask_density"] < describe(paper)["mask_density"]
    assert plan(sparser, 64, 80, batch=64)["memory"]["fsdp"]["activations"] < dense_kernel["memory"]["fsdp"]["activations"]


def test_fits_flips_when_the_memory_drops_with_headroom_kept(toy):
    res = plan(toy, 1, 16)
    assert all(res["memory"][k]["fits"] for k in STRATEGIES)
    total = res["memory"]["ddp"]["total"]
    assert plan(toy, 1, total / 0.9 * 1.01)["memory"]["ddp"]["fits"]
    assert not plan(toy, 1, total / 0.9 * 0.99)["memory"]["ddp"]["fits"]  # it would fit with no headroom
    assert not plan(toy, 1, total * 0.99)["memory"]["ddp"]["fits"]


def test_the_papers_setup_needs_sharding(paper):
    mem = plan(paper, 1024, 16, batch=1024, steps=430_000)["memory"]
    assert not mem["ddp"]["fits"] and not mem["ddp_ckpt"]["fits"]
    assert mem["fsdp_ckpt"]["fits"]
    assert mem["fsdp_ckpt"]["total"] < mem["fsdp"]["total"] < mem["ddp"]["total"]


def test_days_scale_as_one_over_gpus_times_mfu(toy):
    base = plan(toy, 8, 16, batch=256, steps=1000)
    assert plan(toy, 16, 16, batch=256, steps=1000, mfu=0.6)["days"] == pytest.approx(base["days"] / 4)
    assert plan(toy, 8, 16, batch=256, steps=3000)["days"] == pytest.approx(3 * base["days"])
    assert plan(toy, 8, 16, batch=256, steps=1000, gpu_tflops=250)["days"] == pytest.approx(base["days"] / 2)
    assert base["days_checkpointed"] > base["days"]


@pytest.mark.parametrize("kwargs, words", [
    ({"gpus": 0}, "--gpus=0"), ({"gpus": 2.5}, "--gpus=2.5"), ({"gpu_mem_gb": -1}, "--gpu-mem=-1"),
    ({"gpu_mem_gb": float("nan")}, "--gpu-mem=nan"), ({"mfu": 0}, "--mfu=0"), ({"mfu": 1.5}, "--mfu=1.5"),
    ({"gpu_tflops": 0}, "--gpu-tflops=0"), ({"batch": 0}, "--batch=0"), ({"steps": -5}, "--steps=-5"),
    ({"gpus": 3, "batch": 8}, "does not split evenly over 3 GPUs"),
])
def test_bad_values_are_config_errors(toy, kwargs, words):
    args = {"gpus": 2, "gpu_mem_gb": 16, **kwargs}
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        plan(toy, **args)


PLAN = ["plan", "--preset", "toy", "--gpus", "2", "--gpu-mem", "16"]


@pytest.mark.parametrize("argv, words", [
    (["plan", "--preset", "toy", "--gpus", "0", "--gpu-mem", "16"], "argument --gpus: 0 is not a positive number"),
    (["plan", "--preset", "toy", "--gpus", "2", "--gpu-mem", "-16"], "argument --gpu-mem: -16 is not a positive"),
    (PLAN + ["--mfu", "1.5"], "argument --mfu: 1.5 is not in (0, 1]"),
    (PLAN + ["--mfu", "0"], "argument --mfu: 0 is not in (0, 1]"),
    (PLAN + ["--batch", "3"], "--batch=3 does not split evenly over 2 GPUs"),
    (["plan", "--preset", "huge", "--gpus", "2", "--gpu-mem", "16"], "unknown preset 'huge'"),
    (["plan", "--preset", "toy", "--gpus", "2"], "the following arguments are required: --gpu-mem"),
])
def test_bad_input_is_one_error_line_and_exit_2(argv, words, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], err
    assert "Traceback" not in err and not out.strip()


def test_the_command_prints_a_table_and_one_json_line(capsys):
    assert main(PLAN + ["--steps", "100"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert res["steps"] == 100 and res["gpus"] == 2 and set(res["memory"]) == set(STRATEGIES)
    text = "\n".join(out[:-1])
    assert plan_table(res) in text and "FSDP + checkpointing" in text
    assert main(PLAN + ["--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["preset"] == "toy"


def test_errors_are_one_line_from_the_real_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "minidalle", "plan", "--preset", "toy", "--gpus", "2",
                           "--gpu-mem", "16", "--mfu", "2"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith("error: argument --mfu") and not proc.stdout
