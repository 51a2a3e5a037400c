"""VQA-style answer normalisation (EvalAI) and the TextVQA soft accuracy, as upstream LLaVA scores them.

`EvalAIAnswerProcessor` turns a raw answer into the form the EvalAI servers compare (VQAv2, VizWiz
submissions) and the TextVQA scorer compares locally; `TextVQAAccuracyEvaluator` averages the
leave-one-annotator-out soft score over a list of predictions. Used by `llava.eval.eval_textvqa`;
nothing to run directly. Standard library only.
"""

from __future__ import annotations

import re

# Lower-case word -> word with its apostrophe(s). The mixed-case keys ("Im", "Ive", ...) can never
# match (answers are lower-cased first) and "somebody'd" maps to the apostrophe-less spelling; both
# are kept because the EvalAI table has them and scores must not depend on our opinion of it.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't",
    "couldve": "could've", "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES = {"a", "an", "the"}

# Order matters: each character's delete-or-space decision is made in turn.
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]

# A period not followed by a digit, so decimals such as "3.5" survive.
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

# EvalAI passes re.UNICODE (= 32) where `re.sub` expects its count, so at most 32 periods go.
PERIOD_DELETION_CAP = 32


class EvalAIAnswerProcessor:
    """Callable: raw answer string -> normalised answer string (the EvalAI / VQA normalisation)."""

    def __call__(self, answer: str) -> str:
        text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
        text = text.replace("\n", " ").replace("\t", " ").strip()
        text = self.separate_punctuation(text)
        text = PERIOD_NOT_BEFORE_DIGIT.sub("", text, count=PERIOD_DELETION_CAP)
        return self.normalise_words(text)

    @staticmethod
    def separate_punctuation(text: str) -> str:
        """Delete a punctuation character everywhere if it touches a space somewhere, else turn it into
        spaces. The touching test looks at `text` as it came in, not at the partly edited result."""
        # EvalAI also deletes when a comma sits between two digits; commas are gone by now, so that never fires.
        edited = text
        for mark in PUNCTUATION:
            touches_space = mark + " " in text or " " + mark in text
            edited = edited.replace(mark, "" if touches_space else " ")
        return edited

    @staticmethod
    def normalise_words(text: str) -> str:
        """Number words -> digits, articles dropped, contractions given their apostrophes."""
        words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
        return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


class TextVQAAccuracyEvaluator:
    """TextVQA / VQA soft accuracy with 10 human answers per question."""

    ANNOTATORS = 10

    def __init__(self):
        self.answer_processor = EvalAIAnswerProcessor()

    def answer_scores(self, raw_answers: list[str]) -> dict[str, float]:
        """Normalised human answer -> its soft score: the mean over the 10 ways of leaving one annotator
        out of min(1, matches among the other nine / 3). With c copies: 0.3, 0.6, 0.9, then 1.0."""
        answers = [self.answer_processor(answer) for answer in raw_answers]
        if len(answers) != self.ANNOTATORS:
            raise ValueError(f"expected {self.ANNOTATORS} ground-truth answers, got {len(answers)}: {raw_answers!r}")
        scores = {}
        for candidate in set(answers):
            copies = answers.count(candidate)
            # Summed annotator by annotator, as EvalAI does, so the floats agree to the last bit.
            left_out = [min(1, (copies - (answer == candidate)) / 3) for answer in answers]
            scores[candidate] = sum(left_out) / len(left_out)
        return scores

    def eval_pred_list(self, pred_list: list[dict]) -> float:
        """Mean soft score in [0, 1] of items {"pred_answer": str, "gt_answers": [10 str]}; a prediction
        scores 0 unless its normalised form equals a normalised human answer."""
        if not pred_list:
            raise ValueError("no predictions to score")
        scores = [self.answer_scores(entry["gt_answers"]).get(self.answer_processor(entry["pred_answer"]), 0.0)
                  for entry in pred_list]
        return sum(scores) / len(scores)
