"""`evaluate --geneval_results DIR`: GenEval's own results.jsonl re-decided with our rules, summaries side by side."""

import json

import pytest

from evaluation.geneval import read_results_jsonl, summarize
from evaluation.geneval_agreement import agreement
from src.cli import main


def line(filename, metadata, correct, reason, details):
    """One results.jsonl line as GenEval's evaluate_images.py writes it (metadata and details are JSON strings)."""
    return {
        "filename": filename,
        "tag": metadata["tag"],
        "prompt": metadata["prompt"],
        "correct": correct,
        "reason": reason,
        "metadata": json.dumps(metadata),
        "details": json.dumps(details),
    }


CUP = {"tag": "single_object", "include": [{"class": "cup", "count": 1}], "prompt": "a photo of a cup"}
TWO_CUPS = {
    "tag": "counting",
    "include": [{"class": "cup", "count": 2}],
    "exclude": [{"class": "cup", "count": 3}],
    "prompt": "a photo of two cups",
}
DOG_LEFT = {
    "tag": "position",
    "include": [{"class": "cup", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}],
    "prompt": "a photo of a dog left of a cup",
}
RED_CUP = {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}], "prompt": "a photo of a red cup"}
LINES = [
    line("out/00000/samples/0000.png", CUP, True, "", {"cup": [[10.0, 10.0, 50.0, 50.0, 0.9599999785423279]]}),
    line("out/00000/samples/0001.png", CUP, False, "expected cup>=1, found 0", {}),
    line("out/00001/samples/0000.png", TWO_CUPS, True, "",
         {"cup": [[0.0, 0.0, 9.0, 9.0, 0.9900000095367432], [20.0, 0.0, 29.0, 9.0, 0.949999988079071]]}),
    line("out/00001/samples/0001.png", TWO_CUPS, False, "expected cup<3, found 3",
         {"cup": [[0.0, 0.0, 9.0, 9.0, 0.99], [20.0, 0.0, 29.0, 9.0, 0.98], [40.0, 0.0, 49.0, 9.0, 0.97]]}),
    # GenEval's details keep its order: the first dog (left of the cup) is the one "found".
    line("out/00002/samples/0000.png", DOG_LEFT, True, "",
         {"cup": [[100.0, 100.0, 120.0, 120.0, 0.8]], "dog": [[0.0, 100.0, 20.0, 120.0, 0.7], [200.0, 300.0, 220.0, 320.0, 0.7]]}),
    # GenEval printed the relation set in hash order; ours is sorted, and the reasons still count as the same.
    line("out/00002/samples/0001.png", DOG_LEFT, False, "expected dog left of target, found right of and below target",
         {"cup": [[100.0, 100.0, 120.0, 120.0, 0.8]], "dog": [[300.0, 300.0, 320.0, 320.0, 0.7]]}),
    line("out/00003/samples/0000.png", RED_CUP, True, "", {"cup": [[10.0, 10.0, 50.0, 50.0, 0.5]]}),
    line("out/00003/samples/0001.png", RED_CUP, False, "expected red cup>=1, found 0 red; and 1 blue",
         {"cup": [[10.0, 10.0, 50.0, 50.0, 0.5]]}),
]  # fmt: skip


def write(folder, lines):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def test_our_verdicts_equal_genevals_where_they_can_be_redecided(tmp_path):
    records = read_results_jsonl(write(tmp_path / "scored", LINES) / "results.jsonl")
    result = agreement(records)
    assert result["geneval"] == summarize(records)  # summary_scores.py's numbers for the file
    assert result["ours"]["overall"] == result["geneval"]["overall"]
    assert result["tasks"] == {
        "single_object": {"images": 2, "redecided": 2, "agree": 2, "reasons_agree": 2},
        "counting": {"images": 2, "redecided": 2, "agree": 2, "reasons_agree": 2},
        "position": {"images": 2, "redecided": 2, "agree": 2, "reasons_agree": 2},
        "colors": {"images": 2, "redecided": 0, "agree": 0, "reasons_agree": 0},  # no colours in results.jsonl
    }
    assert result["differ"] == []


def test_a_disagreement_is_counted_and_named(tmp_path):
    # A line claiming success for a dog right of the cup: our rules say no.
    wrong = line("out/00009/samples/0000.png", DOG_LEFT, True, "",
                 {"cup": [[100.0, 100.0, 120.0, 120.0, 0.8]], "dog": [[300.0, 100.0, 320.0, 120.0, 0.7]]})  # fmt: skip
    result = agreement(read_results_jsonl(write(tmp_path / "scored", [*LINES, wrong]) / "results.jsonl"))
    assert result["tasks"]["position"]["agree"] == 2 and result["tasks"]["position"]["redecided"] == 3
    assert result["geneval"]["tasks"]["position"] == pytest.approx(2 / 3)
    assert result["ours"]["tasks"]["position"] == pytest.approx(1 / 3)
    (differ,) = result["differ"]
    assert differ == ("out/00009/samples/0000.png", "", "expected dog left of target, found right of target")


def test_evaluate_geneval_results_prints_both_summaries(tmp_path, capsys):
    folder = write(tmp_path / "scored", LINES)
    main(["evaluate", "--geneval_results", str(folder)])
    out = capsys.readouterr().out
    assert f"GenEval results: {folder / 'results.jsonl'} (8 images, 4 prompts)" in out
    assert "colors" in out and "– (colours not in results.jsonl)" in out
    position = next(x for x in out.splitlines() if x.startswith("position"))
    assert position.split()[1:] == ["50.00%", "50.00%", "2/2", "2/2", "2/2"]
    assert "overall" in out and "differs:" not in out

    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--geneval_results", str(tmp_path / "nowhere")])
    assert exc.value.code == 2
    assert "no results.jsonl there" in capsys.readouterr().err
