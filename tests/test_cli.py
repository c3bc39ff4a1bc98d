"""The command line: each command runs, ends with one JSON line, and user errors exit 2 with a message."""

import importlib.util
import json
import subprocess
import sys

import pytest

from minidalle.cli.main import main
from minidalle.config import get_config


def _last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_data_then_judge_round_trip(tmp_path, capsys):
    out = tmp_path / "heldout"
    assert main(["data", "--preset", "smoke", "--split", "heldout", "--n", "12", "--out", str(out)]) == 0
    assert _last_json(capsys)["n"] == 12
    assert len(list(out.glob("*.png"))) == 12 and (out / "captions.jsonl").is_file()

    assert main(["judge", str(out), "--preset", "smoke"]) == 0
    result = _last_json(capsys)
    assert result["n"] == 12 and result["overall"] >= 0.9


def test_judge_notices_wrong_captions(tmp_path, capsys):
    out = tmp_path / "val"
    main(["data", "--split", "val", "--n", "10", "--out", str(out), "--data.image_size=32"])
    capsys.readouterr()
    lines = (out / "captions.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    # Give every image the caption of the next one: most should now fail.
    for row, other in zip(rows, rows[1:] + rows[:1]):
        row["caption"] = other["caption"]
    (out / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["judge", str(out)]) == 0
    assert _last_json(capsys)["overall"] <= 0.3


def test_bench_judge_json_prints_only_the_json_line(capsys):
    assert main(["bench", "judge", "--n", "20", "--preset", "smoke", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    assert set(result) >= {"clean", "degraded", "heavy", "ms_per_image"}
    assert result["clean"]["val"]["n"] == 20


@pytest.mark.parametrize("argv, words", [
    (["data", "--out", "x", "--train.lrr=1"], "unknown config key 'train.lrr'"),
    (["data", "--out", "x", "--preset", "huge"], "unknown preset 'huge'"),
    (["judge", "/nonexistent/folder"], "captions.jsonl not found"),
    (["bench", "judge", "--train.batch_size=many"], "expects int"),
])
def test_user_errors_exit_2_with_a_message(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err


def test_bad_counts_and_output_paths_are_refused(tmp_path, capsys):
    assert main(["data", "--n", "0", "--out", str(tmp_path / "x")]) == 2  # argparse's, as one line
    assert capsys.readouterr().err.startswith("error: argument --n: 0 is not a positive number")
    (tmp_path / "file").write_text("x")
    assert main(["data", "--n", "2", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_module_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "minidalle", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "demo" in res.stdout and "bench" in res.stdout


def test_judge_names_an_unreadable_image(tmp_path, capsys):
    out = tmp_path / "d"
    main(["data", "--preset", "smoke", "--n", "3", "--out", str(out)])
    (out / "00001.png").write_bytes(b"not a png")
    capsys.readouterr()
    assert main(["judge", str(out)]) == 2
    assert "00001.png" in capsys.readouterr().err


def test_train_bpe_writes_a_tokenizer_that_reads_the_captions(tmp_path, capsys):
    from minidalle.bpe import Tokenizer
    from minidalle.data import ShapesWorld

    out = tmp_path / "bpe"
    assert main(["train", "bpe", "--preset", "smoke", f"--text.out_dir={out}"]) == 0
    summary = _last_json(capsys)
    cfg = get_config("smoke", smoke=True)
    assert summary["captions"] == cfg.data.n_train and summary["vocab_size"] == 256 + summary["merges"]
    assert (out / "bpe.model").is_file() and (out / "bpe.vocab").is_file() and (out / "tokenizer.json").is_file()
    tok = Tokenizer.load(out / "bpe.model")
    caption = ShapesWorld("heldout", 16, 0)[0][1]  # a caption from a split the tokenizer never read
    assert tok.decode(tok.encode(caption)) == caption.lower()
    assert summary["max_tokens"] <= summary["longest_possible_tokens"] <= cfg.text.text_len


def test_train_bpe_refuses_a_text_len_that_would_cut_training_captions(tmp_path, capsys):
    out = tmp_path / "bpe"
    assert main(["train", "bpe", "--preset", "smoke", "--text.text_len=8", f"--text.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "longer than text.text_len=8" in err and "--text.text_len" in err
    assert not out.exists(), "a refused tokenizer must leave no files behind"


def test_every_caption_shapesworld_can_write_fits_the_toy_text_length():
    # The full toy recipe (50,000 training captions, not the smoke cap), as `make demo` trains it.
    from minidalle.bpe import RegexTokenizer
    from minidalle.stages.text_tokenizer import training_captions
    from minidalle.data import longest_caption

    cfg = get_config("toy", smoke=False)
    tok = RegexTokenizer(lowercase=cfg.text.lowercase).train(training_captions(cfg.data), cfg.text.vocab_size,
                                                            progress=False)
    longest = longest_caption(lambda text: len(tok.encode(text)))
    assert len(tok.encode(longest)) <= cfg.text.text_len, (longest, len(tok.encode(longest)))


def test_judge_names_the_file_and_line_of_a_caption_it_cannot_read(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "--preset", "smoke", "--n", "3", "--out", str(out)]) == 0
    lines = (out / "captions.jsonl").read_text().splitlines()
    lines[1] = json.dumps({"file": "00001.png", "caption": "zebra " * 2000})
    (out / "captions.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["judge", str(out)]) == 2
    err = capsys.readouterr().err
    assert "captions.jsonl, line 2 (00001.png)" in err and len(err) < 600


def test_judge_counts_images_without_a_caption_line(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "--preset", "smoke", "--n", "3", "--out", str(out)]) == 0
    lines = (out / "captions.jsonl").read_text().splitlines()
    (out / "captions.jsonl").write_text(lines[0] + "\n")
    capsys.readouterr()
    assert main(["judge", str(out)]) == 0
    said = capsys.readouterr().out
    assert "2 image(s)" in said and "no line in captions.jsonl" in said and json.loads(said.splitlines()[-1])["unlisted"] == 2


def test_judge_refuses_an_index_that_points_outside_its_folder(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "--preset", "smoke", "--n", "1", "--out", str(out)]) == 0
    (out / "captions.jsonl").write_text(json.dumps({"file": "../elsewhere.png", "caption": "a red circle"}) + "\n")
    capsys.readouterr()
    assert main(["judge", str(out)]) == 2
    assert "not inside" in capsys.readouterr().err
