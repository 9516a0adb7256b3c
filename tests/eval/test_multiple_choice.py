"""Prompt formats of the commonsense tasks, written out by hand from lm-eval 0.4's task files."""

import pytest

from qalora.eval import multiple_choice as mc
from qalora.eval.task_spec import Selection
from qalora.eval.tasks import registry


def test_hellaswag_cleanup_and_prompt():
    doc = {"activity_label": "Home and Garden", "ctx_a": "[header] How to paint a fence. [title] Buy paint.",
           "ctx_b": "THEN you", "endings": [" pick a  brush [step] now.", "sleep."], "label": "1"}
    item = mc.hellaswag_item(doc)
    context = "Home and Garden: How to paint a fence.. Buy paint. Then you"
    assert item.requests == ((context, " pick a brush now."), (context, " sleep."))
    assert item.gold == 1 and item.lengths == (len("pick a brush now."), len("sleep."))
    assert mc.hellaswag_preprocess("  a [title] b  [x]c ") == "a. b c"


def test_piqa_prompt():
    item = mc.piqa_item({"goal": "Dry a phone", "sol1": "Put it in rice.", "sol2": "Microwave it.", "label": 0})
    assert item.requests == (("Question: Dry a phone\nAnswer:", " Put it in rice."),
                             ("Question: Dry a phone\nAnswer:", " Microwave it."))
    assert item.gold == 0 and item.lengths == (15, 13)


def test_winogrande_partial_scoring():
    doc = {"sentence": "Sarah beat Maria so _ got the prize.", "option1": "Sarah", "option2": "Maria", "answer": "2"}
    item = mc.winogrande_item(doc)
    assert item.requests == (("Sarah beat Maria so Sarah", " got the prize."),
                             ("Sarah beat Maria so Maria", " got the prize."))
    assert item.gold == 1


def test_arc_prompt_and_numeric_labels():
    doc = {"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"], "label": ["1", "2", "3"]},
           "answerKey": "2"}
    item = mc.arc_item(doc)
    assert item.requests[1] == ("Question: Which is a gas?\nAnswer:", " steam") and item.gold == 1
    assert item.lengths == (3, 5, 4)


def test_boolq_prompt():
    item = mc.boolq_item({"passage": "Cats purr.", "question": "do cats purr", "answer": True})
    assert item.requests == (("Cats purr.\nQuestion: do cats purr?\nAnswer:", " no"),
                             ("Cats purr.\nQuestion: do cats purr?\nAnswer:", " yes"))
    assert item.gold == 1 and item.lengths == (2, 3)


def test_openbookqa_prompt_is_the_bare_stem():
    doc = {"question_stem": "The sun is a", "choices": {"text": ["star", "planet"], "label": ["A", "B"]},
           "answerKey": " A"}
    item = mc.openbookqa_item(doc)
    assert item.requests == (("The sun is a", " star"), ("The sun is a", " planet")) and item.gold == 0


def test_siqa_prompt():
    doc = {"context": "Jan gave Tom a gift.", "question": "How does Tom feel?", "answerA": "happy",
           "answerB": "sad", "answerC": "angry", "label": "1"}
    item = mc.siqa_item(doc)
    assert item.requests[0] == ("Q: Jan gave Tom a gift. How does Tom feel?\nA:", " happy")
    assert item.gold == 0 and len(item.requests) == 3


# The packaged validation files: first rows, and sizes.
@pytest.mark.parametrize("name, n, first_context, first_choice", [
    ("piqa", 1838, "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
     " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you will "
     "also need to supply it with a water bottle and a food dish."),
    ("hellaswag", 10042, "Roof shingle removal: A man is sitting on a roof. He", " is using wrap to wrap a pair of skis."),
    ("winogrande", 1267, "Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
    ("arc_easy", 570, "Question: Which technology was developed most recently?\nAnswer:", " cellular telephone"),
    ("arc_challenge", 299, None, " Put the objects in groups."),
    ("boolq", 3270, None, " no"),
    ("openbookqa", 500, "Frilled sharks and angler fish live far beneath the surface of the ocean, which is why they "
                        "are known as", " Deep sea animals"),
    ("siqa", 1954, "Q: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do "
                   "before this?\nA:", " make a new plan"),
])
def test_packaged_data(name, n, first_context, first_choice):
    chosen = registry()[name].load(0, Selection(limit=2, mode="first"))
    assert chosen.n_available == n and [it.index for it in chosen.items] == [0, 1]
    context, choice = chosen.items[0].requests[0]
    assert choice == first_choice
    if first_context is not None:
        assert context == first_context
