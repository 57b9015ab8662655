"""Cards have one spelling; the one reader of older cards maps their spellings to it."""
import pytest

from warm_jax import cards
from warm_jax import reward as reward_lib


def test_old_spellings_read_as_the_one_spelling():
    old = {"kind": "rm_member", "accuracy": {"valid": 0.7}, "lr": 1e-3, "dropout": 0.1,
           "init": "/x/step_4"}
    card = cards.normalize(old)
    assert card == {"kind": "rm_member", "accuracies": {"valid": 0.7}, "learning_rate": 1e-3,
                    "dropout_rate": 0.1, "init_snapshot": "/x/step_4"}
    assert cards.accuracy(old) == 0.7 and reward_lib.card_accuracy(old) == 0.7
    assert cards.accuracy({"kind": "lm"}) is None
    merged = cards.normalize({"kind": "warm", "members": [{"lr": 2e-3, "accuracy": {}}]})
    assert merged["members"] == [{"learning_rate": 2e-3, "accuracies": {}}]


def test_new_cards_refuse_the_old_spellings():
    class Vocab:
        sha256, vocab_size = "ab" * 32, 16

    from warm_jax import model as model_lib

    cfg = model_lib.TransformerConfig(vocab_size=16, num_layers=1, d_model=8, num_heads=1,
                                      num_kv_heads=1, head_dim=8, mlp_dim=16)
    card = cards.lm_card("rm_member", cfg, Vocab, 3, accuracies={"valid": 0.5},
                         learning_rate=1e-3, dropout_rate=0.1)
    assert card["accuracies"] == {"valid": 0.5} and card["step"] == 3
    with pytest.raises(ValueError, match="accuracies"):
        cards.lm_card("rm_member", cfg, Vocab, 3, accuracy={"valid": 0.5})


def test_a_member_ref_reads_a_member_card():
    ref = cards.MemberRef.from_card("/m/member_1", {"member": 1, "lr": 1e-3,
                                                    "dropout_rate": 0.05,
                                                    "accuracies": {"valid": 0.6}}, weight=0.5)
    assert ref.learning_rate == 1e-3 and ref.dropout_rate == 0.05 and ref.weight == 0.5
    assert ref.as_dict()["accuracies"] == {"valid": 0.6} and ref.path == "/m/member_1"


def test_members_are_ranked_on_the_selection_rows_when_every_card_has_them(caplog):
    """accuracies.select (held-out training rows no ensemble trains on) ranks the members;
    cards written before it fall back to accuracies.valid, with a log line."""
    new = [{"accuracies": {"valid": 0.9, "select": 0.6}},
           {"accuracies": {"valid": 0.7, "select": 0.8}}]
    assert reward_lib.card_accuracy(new[0]) == 0.6
    assert reward_lib.card_accuracy(new[0], "valid") == 0.9
    assert reward_lib.ranking_split(new) == "select"
    assert reward_lib.rank_by_accuracy(["a", "b"], new) == [1, 0]
    assert reward_lib.rank_by_accuracy(["a", "b"], new, split="valid") == [0, 1]
    old = [{"accuracies": {"valid": 0.9}}, {"accuracy": {"valid": 0.7}}]
    with caplog.at_level("INFO", logger="warm_jax"):
        assert reward_lib.rank_by_accuracy(["a", "b"], old) == [0, 1]
    assert "by accuracies.valid" in caplog.text
    # one old card among new ones: all are ranked on valid (never two splits mixed)
    assert reward_lib.ranking_split([new[0], old[0]]) == "valid"
    assert reward_lib.rank_by_accuracy(["a", "b"], [new[1], old[0]]) == [1, 0]
