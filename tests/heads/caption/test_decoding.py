"""Caption decoding without a model: settings checks, presets, the arguments given to `generate`,
the clean-up of generated text, and the LSTM schedule's token filter on hand-made scores."""
import pytest
import torch

from clipposter.errors import ConfigError
from clipposter.heads.caption.decoding import (DEFAULT_STRATEGY, PRESETS, STRATEGIES, DecodingConfig, WordScheduledTopN,
                                       decoding_preset, generate_kwargs, postprocess, word_start_table)


# ----------------------------------------------------------------------------- settings

def test_default_config_is_the_lstm_schedule_and_valid():
    cfg = DecodingConfig()
    assert DEFAULT_STRATEGY == "lstm" and cfg.strategy == "lstm"
    assert cfg.validate() is cfg
    assert decoding_preset() == cfg
    d = cfg.to_dict()
    assert d["num_beams"] == 4 and d["top_p"] == 1.0 and d["top_k"] == 0 and d["max_new_tokens"] is None
    assert d["cut_partial"] is False and d["num_return"] == 1 and d["repetition_penalty"] == 1.0


@pytest.mark.parametrize("overrides, message", [
    ({"strategy": "nucleus"}, r"^strategy must be one of greedy, beam, poster2plot, sample, lstm, got 'nucleus'$"),
    ({"num_return": 0}, r"^num_return must be at least 1, got 0$"),
    ({"strategy": "greedy", "num_return": 2}, r"^num_return is 2, but greedy decoding gives one candidate per poster"),
    ({"strategy": "beam", "num_beams": 2, "num_return": 3}, r"^num_beams must be at least num_return \(3\).*got 2$"),
    ({"strategy": "poster2plot", "num_beams": 2, "num_return": 3}, r"^num_beams must be at least num_return \(3\)"),
    ({"num_beams": 0}, r"^num_beams must be at least 1, got 0$"),
    ({"temperature": 0.0}, r"^temperature must be positive, got 0.0$"),
    ({"top_p": 0.0}, r"^top_p must be in \(0, 1\], got 0.0$"),
    ({"top_p": 1.01}, r"^top_p must be in \(0, 1\]"),
    ({"top_k": -1}, r"^top_k must be 0 \(off\) or positive, got -1$"),
    ({"repetition_penalty": 0.0}, r"^repetition_penalty must be positive \(1.0 = off\), got 0.0$"),
    ({"max_new_tokens": 0}, r"^max_new_tokens must be at least 1, got 0$"),
    ({"min_new_tokens": -1}, r"^min_new_tokens must be between 0 and max_new_tokens, got -1$"),
    ({"min_new_tokens": 5, "max_new_tokens": 4}, r"^min_new_tokens must be between 0 and max_new_tokens, got 5$"),
])
def test_bad_settings_are_one_line_errors_naming_the_parameter(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        DecodingConfig(**overrides).validate()
    assert str(err.value).startswith(err.value.field + " ") and err.value.field in DecodingConfig.__dataclass_fields__


@pytest.mark.parametrize("ok", [
    {"strategy": "sample", "num_return": 3}, {"strategy": "lstm", "num_return": 2}, {"strategy": "greedy"},
    {"strategy": "beam", "num_beams": 3, "num_return": 3}, {"top_p": 1.0}, {"top_k": 0}, {"num_beams": 1},
    {"max_new_tokens": 1}, {"min_new_tokens": 4, "max_new_tokens": 4}, {"min_new_tokens": 3},
    {"temperature": 0.01, "repetition_penalty": 0.5},
])
def test_edge_settings_are_accepted(ok):
    DecodingConfig(**ok).validate()


def test_presets_and_overrides():
    assert set(PRESETS) == set(STRATEGIES)
    assert decoding_preset("greedy") == DecodingConfig(strategy="greedy")
    assert decoding_preset("beam") == DecodingConfig(strategy="beam", num_beams=4)
    assert decoding_preset("poster2plot") == DecodingConfig(strategy="poster2plot", num_beams=4,
                                                            no_repeat_ngram_size=3, length_penalty=2.0)
    assert decoding_preset("sample") == DecodingConfig(strategy="sample", top_k=50, top_p=0.95, temperature=1.0)
    # Explicit settings override the preset; None means "not given".
    cfg = decoding_preset("poster2plot", num_beams=6, length_penalty=None, seed=3)
    assert (cfg.num_beams, cfg.length_penalty, cfg.no_repeat_ngram_size, cfg.seed) == (6, 2.0, 3, 3)
    with pytest.raises(ConfigError, match=r"^strategy must be one of .*got 'nucleus'"):
        decoding_preset("nucleus")
    with pytest.raises(TypeError, match=r"unknown decoding settings: \['beams', 'x'\]"):
        decoding_preset("beam", beams=4, x=1)
    with pytest.raises(ConfigError, match="^top_p"):  # the result is validated
        decoding_preset("sample", top_p=2.0)


# ----------------------------------------------------------------------------- generate arguments

def test_generate_arguments_of_greedy_set_every_sampling_knob_off():
    kw = generate_kwargs(decoding_preset("greedy"), max_new_tokens=7, eos_id=5, pad_id=6)
    assert kw == {"max_new_tokens": 7, "min_new_tokens": None, "eos_token_id": 5, "pad_token_id": 6,
                  "use_cache": True, "num_return_sequences": 1, "repetition_penalty": None,
                  "no_repeat_ngram_size": None, "do_sample": False, "num_beams": 1, "top_k": None,
                  "top_p": None, "temperature": None}


def test_generate_arguments_of_each_strategy():
    beam = generate_kwargs(decoding_preset("poster2plot", num_return=2, repetition_penalty=1.3, min_new_tokens=2),
                           10, 1, 2)
    assert (beam["num_beams"], beam["length_penalty"], beam["early_stopping"], beam["no_repeat_ngram_size"],
            beam["num_return_sequences"], beam["repetition_penalty"], beam["min_new_tokens"], beam["do_sample"]) == \
        (4, 2.0, True, 3, 2, 1.3, 2, False)
    sample = generate_kwargs(decoding_preset("sample", temperature=0.7), 10, 1, 2)
    assert (sample["do_sample"], sample["top_k"], sample["top_p"], sample["temperature"], sample["num_beams"]) == \
        (True, 50, 0.95, 0.7, 1)
    plain = generate_kwargs(decoding_preset("sample", top_k=0, top_p=1.0), 10, 1, 2)
    assert plain["top_k"] is None and plain["top_p"] is None
    starts = torch.tensor([True, False])
    lstm = generate_kwargs(decoding_preset("lstm", temperature=0.9), 10, 1, 2, word_starts=starts)
    assert lstm["do_sample"] is True and lstm["temperature"] == 0.9 and lstm["num_beams"] == 1
    (proc,) = lstm["logits_processor"]
    assert isinstance(proc, WordScheduledTopN) and proc.word_starts is starts
    with pytest.raises(ValueError, match="needs the tokenizer's word-start table"):
        generate_kwargs(decoding_preset("lstm"), 10, 1, 2)


# ----------------------------------------------------------------------------- post-processing

@pytest.mark.parametrize("raw, cut, expected", [
    ("  Some\tthings \n  you   never forget.  ", False, "Some things you never forget."),
    ("The night is young.. and then", False, "The night is young."),
    ("The night is young .. and then", False, "The night is young."),
    ("Wait for it… more", False, "Wait for it."),
    ("One. Two", False, "One. Two"),
    ("......", False, ""),
    ("", True, ""),
    ("Two hearts. One summer. And the", True, "Two hearts. One summer."),
    ("Two hearts. One summer.  And the", True, "Two hearts. One summer."),
    ("Complete sentence.", True, "Complete sentence."),
    ("No full stop at all", True, "No full stop at all"),
    ("Run! Hide? Now", True, "Run! Hide?"),
    ('He said "run." And then', True, 'He said "run."'),
    ("Hide (now). Or", True, "Hide (now)."),
    ("Version 2.0 is here", True, "Version 2.0 is here"),
    ("It ends.. badly. Or", True, "It ends."),
])
def test_postprocess(raw, cut, expected):
    assert postprocess(raw, cut_partial=cut) == expected


def test_postprocess_keeps_partial_sentences_by_default():
    assert postprocess("Two hearts. One summer. And the") == "Two hearts. One summer. And the"


# ----------------------------------------------------------------------------- LSTM schedule

class ByteTokenizer:
    """A tokenizer whose pieces carry GPT-2's leading-space mark 'Ġ' on even ids."""

    def __init__(self, n, mark="Ġ"):
        self.n, self.mark = n, mark

    def __len__(self):
        return self.n

    def convert_ids_to_tokens(self, ids):
        return [f"{self.mark}w{i}" if i % 2 == 0 else f"p{i}" for i in ids]


class PlainTokenizer(ByteTokenizer):
    """No marks in its pieces: word starts are found by decoding each token."""

    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]

    def decode(self, ids):
        return " w" if ids[0] % 3 == 0 else "x"


@pytest.mark.parametrize("mark", ["Ġ", "▁", "Ċ"])
def test_word_start_table_reads_leading_space_marks(mark):
    table = word_start_table(ByteTokenizer(6, mark), vocab_size=8)
    assert table.dtype == torch.bool
    assert table.tolist() == [True, False, True, False, True, False, False, False]  # padded rows: False


def test_word_start_table_decodes_tokens_without_marks_and_cuts_to_the_vocabulary():
    assert word_start_table(PlainTokenizer(7), vocab_size=5).tolist() == [True, False, False, True, False]


def test_word_scheduled_top_n_follows_the_lstm_schedule():
    # Tokens 0-9 start words, 10-19 continue them.
    starts = torch.tensor([True] * 10 + [False] * 10)
    proc = WordScheduledTopN(starts)
    word_start_best = torch.cat([torch.arange(10, 20), torch.arange(10)]).float()[None]  # token 9 best, then 8...
    cases = [
        ([], 4),  # nothing generated: word 1 begins, top 4
        ([1], 4),  # 1 word begun
        ([1, 2, 3, 10, 11], 4),  # 3 words begun: still top 4
        ([1, 2, 3, 4], 2),  # 4 words begun: top 2
        ([1, 2, 3, 4, 12, 5], 2),  # 5 words
        ([1, 2, 3, 4, 5, 6], 2),  # 6 words
        ([1, 2, 3, 4, 5, 6, 7], 1),  # 7 words: greedy
        ([1, 2, 3, 4, 5, 6, 7, 8], 1),
    ]
    for tokens, n in cases:
        row = torch.tensor([tokens], dtype=torch.long).reshape(1, len(tokens))
        out = proc(row, word_start_best.clone())
        kept = torch.isfinite(out[0]).nonzero().flatten().tolist()
        assert kept == list(range(10 - n, 10)), (tokens, kept)
        assert torch.equal(out[0, 10 - n:10], word_start_best[0, 10 - n:10])  # kept scores unchanged


def test_word_scheduled_top_n_is_greedy_inside_a_word_and_per_row():
    starts = torch.tensor([True] * 10 + [False] * 10)
    proc = WordScheduledTopN(starts)
    continuation_best = torch.arange(20).float()[None]  # token 19 (a continuation piece) is best
    out = proc(torch.tensor([[1]]), continuation_best.clone())
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [19]
    # Two rows in one batch: each follows its own count of words.
    word_start_best = torch.cat([torch.arange(10, 20), torch.arange(10)]).float()[None]
    out = proc(torch.tensor([[1, 2, 3, 4, 5], [1, 10, 11, 12, 13]]), word_start_best.repeat(2, 1))
    assert torch.isfinite(out[0]).sum() == 2 and torch.isfinite(out[1]).sum() == 4
    # A custom schedule: top 3 for the first 2 words, then greedy.
    custom = WordScheduledTopN(starts, schedule=((2, 3),))
    assert torch.isfinite(custom(torch.tensor([[1]]), word_start_best.clone())[0]).sum() == 3
    assert torch.isfinite(custom(torch.tensor([[1, 2]]), word_start_best.clone())[0]).sum() == 1


def test_word_scheduled_top_n_handles_ids_beyond_the_table():
    # The LM's output layer can be wider than the tokenizer: ids past the table count as non-starts.
    starts = torch.tensor([True, False, True, False])
    proc = WordScheduledTopN(starts)
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0, 9.0, 8.0]])  # best id 4 is outside the table
    out = proc(torch.tensor([[0, 7]]), scores.clone())
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [4]


def test_word_count_starts_at_the_first_generated_token():
    # A schedule that samples only for the first word: top 3 before anything is generated, greedy
    # once one token (word 1) exists, whatever that token is.
    starts = torch.tensor([True, False, False, True])
    first_word_only = WordScheduledTopN(starts, schedule=((1, 3),))
    scores = torch.tensor([[4.0, 1.0, 2.0, 3.0]])  # best id 0 starts a word
    assert torch.isfinite(first_word_only(torch.zeros((1, 0), dtype=torch.long), scores.clone())).sum() == 3
    assert torch.isfinite(first_word_only(torch.tensor([[1]]), scores.clone())).sum() == 1
    assert torch.isfinite(first_word_only(torch.tensor([[0]]), scores.clone())).sum() == 1


def test_word_count_reads_the_first_and_last_ids_of_the_table():
    starts = torch.tensor([True, False, False, True])
    two_words = WordScheduledTopN(starts, schedule=((2, 3),))
    scores = torch.tensor([[4.0, 1.0, 2.0, 3.0]])
    # [2, 0]: id 0 starts word 2 -> greedy; [2, 3]: id 3 (the table's last) starts word 2 -> greedy.
    assert torch.isfinite(two_words(torch.tensor([[2, 0]]), scores.clone())).sum() == 1
    assert torch.isfinite(two_words(torch.tensor([[2, 3]]), scores.clone())).sum() == 1
    # [2, 1]: still word 1 -> top 3.
    assert torch.isfinite(two_words(torch.tensor([[2, 1]]), scores.clone())).sum() == 3


def test_each_row_decides_from_its_own_best_token():
    # Row 0's best token continues a word (greedy), row 1's best starts one (top 4): one batch.
    starts = torch.tensor([True] * 10 + [False] * 10)
    proc = WordScheduledTopN(starts)
    continuation_best = torch.arange(20).float()
    word_start_best = torch.cat([torch.arange(10, 20), torch.arange(10)]).float()
    out = proc(torch.tensor([[1], [1]]), torch.stack([continuation_best, word_start_best]))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [19]
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [6, 7, 8, 9]
