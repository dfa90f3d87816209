"""Plain-text corpora for continued pretraining and forgetting checks.

The domain corpus describes a fixed catalogue of made-up minerals. Every
mineral keeps the same facts in every document, whatever the seed, and the
sentences follow a few templates, so a tiny LM trained on some documents
clearly lowers its perplexity on held-out ones. The general corpus looks
different (everyday scenes) so that losing it after domain training shows up
as forgetting.
"""

from __future__ import annotations

import random

from posttrain.data.synthetic.tasks import make_task_rows

_CATALOGUE_SEED = 1234
_CATALOGUE_SIZE = 40

_COLOURS = ("red", "blue", "green", "violet", "amber", "grey", "white", "black", "golden", "pink")
_LUSTRES = ("glassy", "dull", "metallic", "pearly", "silky", "waxy")
_SHAPES = ("cubes", "needles", "thin plates", "long prisms", "small grains", "rounded nodules")
_USES = ("lamps", "jewellery", "cutting tools", "mirrors", "bells", "glass", "paint", "clocks")
_PLACES = (
    "the Ashen Valley",
    "Mount Orrel",
    "the Varn Coast",
    "the Deep Mines of Kesh",
    "the Salt Plains",
    "Lake Ondra",
    "the Iron Hills",
    "the Caves of Tulm",
    "the Red Desert",
    "the Northern Fjords",
    "Pell Island",
    "the Glass Canyon",
)

_FIRST_SENTENCE = "{name} is a {colour} mineral found in {place}."
_MORE_SENTENCES = (
    "It has a hardness of {hardness} and a {lustre} lustre.",
    "Its crystals grow as {shape}.",
    "{name} is mostly used to make {use}.",
    "It was first described in {year}.",
    "Miners in {place} sort {name} by colour before selling it.",
    "Under a lamp, {name} looks {colour} with a {lustre} shine.",
    "A piece of {name} with a hardness of {hardness} can scratch softer stones.",
)


def _catalogue() -> list[dict]:
    # Built from a fixed seed so the facts about a mineral never depend on
    # which documents were asked for.
    rng = random.Random(_CATALOGUE_SEED)
    names: list[str] = []
    while len(names) < _CATALOGUE_SIZE:
        stem = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(2))
        name = stem.capitalize() + "ite"
        if name not in names:
            names.append(name)
    return [
        {
            "name": name,
            "colour": rng.choice(_COLOURS),
            "place": rng.choice(_PLACES),
            "hardness": rng.randint(1, 10),
            "lustre": rng.choice(_LUSTRES),
            "shape": rng.choice(_SHAPES),
            "use": rng.choice(_USES),
            "year": rng.randint(1700, 1950),
        }
        for name in names
    ]


def make_domain_corpus(n_docs: int, seed: int) -> list[str]:
    """``n_docs`` catalogue entries of 2-6 templated sentences about one mineral each."""
    rng = random.Random(seed)
    catalogue = _catalogue()
    docs = []
    for _ in range(n_docs):
        facts = rng.choice(catalogue)
        extra = sorted(rng.sample(range(len(_MORE_SENTENCES)), rng.randint(1, 5)))
        sentences = [_FIRST_SENTENCE] + [_MORE_SENTENCES[i] for i in extra]
        docs.append(" ".join(s.format(**facts) for s in sentences))
    return docs


_PEOPLE = ("Anna", "Tom", "Maria", "James", "Lucy", "Omar", "Grace", "Daniel", "Sofia", "Peter")
_GENERAL_SENTENCES = (
    "{person} walked to the {shop} on {day} and bought some {food}.",
    "The {thing} in the kitchen was {state}, so {person} opened the window.",
    "Did you see the {animal} near the {shop} this morning?",
    "After lunch, {person} wrote a letter to {other} about the {event}.",
    "It rained all {time}, and the streets were {weather}.",
    "{person} likes to read about {topic} before going to sleep.",
    "We should leave early, because the {transport} is often late on {day}.",
    "My friend {other} said the {event} was the best one in years!",
    "There were {number} people waiting outside the {shop} at noon.",
)
_SLOTS = {
    "shop": ("bakery", "market", "library", "station", "post office", "pharmacy"),
    "day": ("Monday", "Tuesday", "Friday", "Saturday", "Sunday"),
    "food": ("bread", "apples", "cheese", "coffee", "rice", "tomatoes"),
    "thing": ("oven", "kettle", "air", "soup", "floor"),
    "state": ("too hot", "very warm", "smoky", "damp"),
    "animal": ("cat", "fox", "old dog", "pigeon", "rabbit"),
    "event": ("concert", "wedding", "football match", "school play", "festival"),
    "time": ("morning", "afternoon", "evening", "night", "weekend"),
    "weather": ("wet", "empty", "flooded", "quiet", "slippery"),
    "topic": ("history", "gardening", "the ocean", "old trains", "cooking"),
    "transport": ("bus", "train", "ferry", "tram"),
    "number": ("two", "five", "twelve", "twenty", "forty"),
}


def make_general_corpus(n_docs: int, seed: int) -> list[str]:
    """``n_docs`` short paragraphs (2-6 sentences) of everyday English."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            template = rng.choice(_GENERAL_SENTENCES)
            person, other = rng.sample(_PEOPLE, 2)
            values = {slot: rng.choice(choices) for slot, choices in _SLOTS.items()}
            sentences.append(template.format(person=person, other=other, **values))
        docs.append(" ".join(sentences))
    return docs


def tokenizer_corpus() -> list[str]:
    """The fixed text the tiny BPE tokenizer is trained on.

    Covers everything the synthetic data will show the model (domain and general
    prose, task prompts with digits, quotes and capitals, the ChatML role names)
    so frequent strings get their own tokens. Special tokens are left out: they
    are added whole and must not spend merges.
    """
    task_texts = [
        f"user\n{row['messages'][0]['content']}\nassistant\n{row['answer']}\n"
        for row in make_task_rows(800, seed=2)
    ]
    return make_domain_corpus(300, seed=0) + make_general_corpus(300, seed=1) + task_texts
