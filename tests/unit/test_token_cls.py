"""Token classification: the CoNLL reader, label alignment, entity scores and the baseline."""

from pathlib import Path

import pytest

from bigmodel.data.conll import detect_scheme, read_conll, to_iob2
from bigmodel.errors import BigModelError
from bigmodel.tasks.token_cls import (
    IGNORE,
    align_labels,
    entity_scores,
    most_frequent_tag_baseline,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "conll"


# --- CoNLL files --------------------------------------------------------------------------------

def write(tmp_path: Path, text: str, name: str = "x.txt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_read_conll_takes_first_and_last_column_and_skips_docstart(tmp_path):
    path = write(tmp_path, "-DOCSTART- -X- -X- O\n\nEU NNP I-NP I-ORG\nrejects VBZ I-VP O\n\n"
                           "-DOCSTART- -X- -X- O\nPeter NNP I-NP I-PER\nBlackburn NNP I-NP I-PER\n")
    assert read_conll(path) == [(["EU", "rejects"], ["I-ORG", "O"]),
                                (["Peter", "Blackburn"], ["I-PER", "I-PER"])]


def test_iob1_becomes_iob2_and_iob2_is_unchanged():
    iob1 = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG", "I-MISC"]
    iob2 = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-ORG", "B-MISC"]
    assert to_iob2(iob1) == iob2
    assert to_iob2(iob2) == iob2  # idempotent
    assert detect_scheme([([], iob1)]) == "IOB1"
    assert detect_scheme([([], iob2)]) == "IOB2"


def test_fixture_train_is_iob1_dev_and_test_are_iob2_with_four_entity_types():
    splits = {name: read_conll(FIXTURE / f"{name}.txt") for name in ("train", "dev", "test")}
    assert detect_scheme(splits["train"]) == "IOB1"
    assert detect_scheme(splits["dev"]) == detect_scheme(splits["test"]) == "IOB2"
    assert [len(s) for s in splits.values()] == [40, 15, 15]
    types = {t[2:] for sents in splits.values() for _, tags in sents for t in tags if t != "O"}
    assert types == {"PER", "ORG", "LOC", "MISC"}


def test_bad_tag_error_names_file_line_and_valid_tags(tmp_path):
    path = write(tmp_path, "EU NNP I-NP B-ORG\n\nPeter NNP I-NP PER\n")
    with pytest.raises(BigModelError, match=r"x\.txt:3: tag 'PER' is not valid; tags are O, "
                                            r"B-TYPE or I-TYPE"):
        read_conll(path)


def test_iobes_tags_are_refused(tmp_path):
    with pytest.raises(BigModelError, match=r":1: tag 'S-LOC'.*E-/S- are not read"):
        read_conll(write(tmp_path, "Paris NNP I-NP S-LOC\n"))


def test_one_column_line_is_an_error_with_its_line_number(tmp_path):
    path = write(tmp_path, "EU B-ORG\nrejects\n")
    with pytest.raises(BigModelError, match=r"x\.txt:2: one column \('rejects'\)"):
        read_conll(path)


def test_non_utf8_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Zürich NNP I-NP B-LOC\n".encode("latin-1"))
    with pytest.raises(BigModelError, match=r"latin1\.txt: not UTF-8") as err:
        read_conll(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["", "\n\n", "-DOCSTART- -X- -X- O\n\n"])
def test_file_without_sentences_is_an_error(tmp_path, text):
    with pytest.raises(BigModelError, match="no sentences"):
        read_conll(write(tmp_path, text))


# --- Label alignment ----------------------------------------------------------------------------

def test_align_labels_tags_first_subword_and_ignores_the_rest_and_specials():
    # [CLS] New York ##er is [SEP] [PAD]: words 0=New 1=Yorker 2=is
    word_ids = [None, 0, 1, 1, 2, None, None]
    assert align_labels(word_ids, [3, 4, 0]) == [IGNORE, 3, 4, IGNORE, 0, IGNORE, IGNORE]
    assert IGNORE == -100


def test_align_labels_rejects_a_word_id_without_a_tag():
    with pytest.raises(ValueError, match="word id 2 out of range"):
        align_labels([0, 2], [1, 1])


# --- Entity scores ------------------------------------------------------------------------------

def test_entity_scores_count_a_partial_span_as_a_miss():
    actual = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "B-LOC"]]
    s = entity_scores(actual, predicted)
    # actual: PER(0-1) LOC(3) ORG(0); predicted: PER(0) LOC(3) ORG(0) LOC(1) → 2 of 4 correct
    assert s["precision"] == pytest.approx(2 / 4)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    assert s["support"] == 3
    assert s["token_accuracy"] == pytest.approx(4 / 6)
    assert s["per_type"]["PER"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert s["per_type"]["LOC"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3),
                                    "support": 1}
    assert s["per_type"]["ORG"]["f1"] == 1.0


def test_entity_scores_strict_mode_does_not_credit_an_entity_started_by_i():
    s = entity_scores([["B-PER", "I-PER", "O"]], [["I-PER", "I-PER", "O"]])
    assert s["f1"] == 0.0  # conlleval (seqeval's default mode) would count this span correct
    assert s["token_accuracy"] == pytest.approx(2 / 3)


def test_entity_scores_perfect_and_no_entity_cases():
    tags = [["B-LOC", "I-LOC", "O"]]
    assert entity_scores(tags, tags)["f1"] == 1.0
    empty = entity_scores([["O", "O"]], [["O", "O"]])
    assert empty["f1"] == 0.0 and empty["token_accuracy"] == 1.0 and empty["per_type"] == {}


def test_entity_scores_reject_length_mismatches():
    with pytest.raises(ValueError, match="1 actual sentences but 2 predicted"):
        entity_scores([["O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="sentence 0: 2 actual tags but 1 predicted"):
        entity_scores([["O", "O"]], [["O"]])


# --- Baseline -----------------------------------------------------------------------------------

def test_baseline_uses_the_most_frequent_tag_o_for_unseen_words_and_repairs_iob():
    train_tokens = [["Paris", "is", "big"], ["Paris", "Hilton"], ["in", "Paris"], ["New", "York"],
                    ["York", "wins"], ["tie"], ["tie"]]
    train_tags = [["B-LOC", "O", "O"], ["B-PER", "I-PER"], ["O", "B-LOC"], ["B-LOC", "I-LOC"],
                  ["B-ORG", "O"], ["B-ORG"], ["O"]]
    predicted = most_frequent_tag_baseline(train_tokens, train_tags,
                                           [["Paris", "Hilton", "Rome"], ["York", "tie"],
                                            ["Hilton"]])
    assert predicted == [
        ["B-LOC", "B-PER", "O"],  # Paris: LOC 2 to 1; Hilton's I-PER → B-PER; Rome: unseen
        ["B-ORG", "O"],  # York: B-ORG vs I-LOC tie → the smaller tag; tie: O wins a tie
        ["B-PER"],  # an I- at the start of a sentence becomes B-
    ]


def test_baseline_on_the_conll_fixture_is_useful_but_far_from_perfect():
    train = read_conll(FIXTURE / "train.txt")
    test = read_conll(FIXTURE / "test.txt")
    predicted = most_frequent_tag_baseline([w for w, _ in train], [to_iob2(t) for _, t in train],
                                           [w for w, _ in test])
    s = entity_scores([t for _, t in test], predicted)
    assert 0.4 < s["f1"] < 0.9
