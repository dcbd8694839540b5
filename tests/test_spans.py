from vstream.attr.spans import SpanSplitter, span_end_tokens


def feed(pieces):
    sp = SpanSplitter()
    events = []
    for i, p in enumerate(pieces):
        events.append([s.text for s in sp.push(i, p)])
    events.append([s.text for s in sp.finish()])
    return sp, events


def test_spans_close_as_soon_as_their_end_arrives():
    pieces = ["<think>", " I", " see", " a", " red", " circle", ".", " It", " is", " big", ".", " </think>", " red"]
    sp, events = feed(pieces)
    assert events[6] == ["I see a red circle."]  # closed by the '.' token itself
    assert events[10] == ["It is big."]
    assert events[-1] == ["red"]
    assert [s.kind for s in sp.spans] == ["thought", "thought", "answer"]
    first = sp.spans[0]
    assert (first.token_start, first.token_end) == (1, 7)
    assert "".join(pieces[first.token_start : first.token_end]).strip() == first.text


def test_decimal_point_is_not_a_sentence_end():
    sp, events = feed(["<think>", " It", " is", " 3", ".", "5", " cm", ".", " Next", " one", " </think>", " 3"])
    assert events[4] == [] and events[5] == []
    assert sp.spans[0].text == "It is 3.5 cm."
    assert events[7] == ["It is 3.5 cm."]


def test_number_then_period_closes_on_the_next_character():
    sp, events = feed(["<think>", " So", " there", " are", " 2", ".", " Done", "."])
    assert events[5] == []  # might be a decimal point
    assert events[6] == ["So there are 2."]
    assert (sp.spans[0].token_start, sp.spans[0].token_end) == (1, 6)


def test_trace_without_sentence_end_and_unclosed_think():
    sp, events = feed(["<think>", " looking", " at", " the", " image"])
    assert events[-1] == ["looking at the image"]
    assert sp.spans[0].closed_by == "end"


def test_empty_trace_gives_no_span():
    sp, events = feed([])
    assert sp.spans == [] and events == [[]]


def test_think_close_ends_a_sentence_without_terminator():
    sp, events = feed(["<think>", " a", " b", "</think>", " yes"])
    assert events[3] == ["a b"] and sp.spans[0].token_end == 3
    assert events[-1] == ["yes"]


def test_span_end_tokens_hold_every_token_that_closes_a_span(tiny_tokenizer):
    """The live worker hands tokens over in groups except around these: a token outside the set
    must never close an open sentence (a '.' after a digit closes on the next token, which the
    worker covers by handing over the two tokens after one of these at once)."""
    ends = span_end_tokens(tiny_tokenizer)
    closing = set()
    for i in range(len(tiny_tokenizer)):
        piece = tiny_tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        sp = SpanSplitter()
        sp.push(0, "Look")
        if sp.push(1, piece):
            closing.add(i)
    assert closing and closing <= ends
    assert len(ends) < len(tiny_tokenizer) // 2  # most tokens can be grouped
    assert span_end_tokens(object()) is None  # no vocabulary: every token is handed over at once
