"""StopStringMatcher: stops across deltas, overlapping prefixes, bounded hold-back, flush."""
from __future__ import annotations

import pytest

from glmserve.engine.text.stop_strings import StopStringMatcher


def run(stops: list[str], deltas: list[str]) -> tuple[list[str], bool, str]:
    """Feed deltas until a stop; return what was emitted per delta, whether it stopped, and the flushed tail."""
    matcher = StopStringMatcher(stops)
    emitted = []
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        emitted.append(text)
        if stopped:
            return emitted, True, matcher.flush()
    return emitted, False, matcher.flush()


def test_no_stops_passes_deltas_through():
    assert run([], ["a", "bc", "", "d"]) == (["a", "bc", "", "d"], False, "")


def test_stop_within_one_delta():
    assert run(["END"], ["hello END world"]) == (["hello "], True, "")


def test_stop_spanning_several_deltas():
    emitted, stopped, tail = run(["</answer>"], ["The answer</", "ans", "wer> trailing"])
    assert "".join(emitted) == "The answer" and stopped and tail == ""
    assert emitted[0] == "The answer"  # "</" held back, nothing of the stop leaks out


def test_stop_at_the_very_start():
    assert run(["Hi"], ["Hi there"]) == ([""], True, "")
    assert run(["Hi"], ["H", "i there"]) == (["", ""], True, "")


def test_overlapping_stops_earliest_match_wins():
    emitted, stopped, _ = run(["abc", "bcd"], ["xa", "bcd"])
    assert "".join(emitted) == "x" and stopped
    emitted, stopped, _ = run(["abc", "bcd"], ["xb", "cd"])
    assert "".join(emitted) == "x" and stopped


def test_partial_prefix_that_does_not_complete_is_released():
    emitted, stopped, tail = run(["abc", "bcd"], ["xab", "x", "yz"])
    assert emitted == ["x", "abx", "yz"] and not stopped and tail == ""


def test_hold_back_is_bounded_and_only_for_possible_stops():
    matcher = StopStringMatcher(["abcdef"])
    assert matcher.feed("zzabcde") == ("zz", False)  # 5 = len(stop) - 1 held
    assert matcher.feed("x") == ("abcdex", False)
    assert matcher.feed("hello") == ("hello", False)  # nothing here can begin the stop


def test_flush_returns_held_tail_when_no_stop():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("the end ST") == ("the end ", False)
    assert matcher.flush() == "ST"
    assert matcher.flush() == ""


def test_feed_after_stop_emits_nothing():
    matcher = StopStringMatcher(["."])
    assert matcher.feed("one. two") == ("one", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_multibyte_text_and_char_by_char_stream():
    text = "答案是四十二。结束了"
    emitted, stopped, _ = run(["结束"], list(text))
    assert "".join(emitted) == "答案是四十二。" and stopped


@pytest.mark.parametrize("split", range(1, 12))
def test_every_split_point_gives_the_same_result(split):
    text = "say abcd then stop"
    emitted, stopped, tail = run(["bcd", "abce"], [text[:split], text[split:]])
    assert "".join(emitted) == "say a" and stopped and tail == ""


def test_empty_stop_string_rejected():
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])
