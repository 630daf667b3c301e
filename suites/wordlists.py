"""Words and sentences the generated suites are built from, all written for this project."""
from __future__ import annotations

import random
import string
import uuid

ADJECTIVES = (
    "amber", "ancient", "autumn", "bitter", "blunt", "brave", "breezy", "bright", "brisk", "calm", "clever",
    "copper", "crimson", "curly", "dusty", "eager", "early", "faint", "fancy", "fierce", "frosty", "gentle",
    "giant", "gloomy", "golden", "grumpy", "hollow", "humble", "icy", "jolly", "lazy", "lively", "lonely",
    "loud", "lucky", "marble", "mellow", "misty", "modest", "muddy", "narrow", "nimble", "noisy", "olive",
    "patient", "plain", "polite", "proud", "quiet", "rapid", "rusty", "sandy", "scarlet", "shaggy", "silent",
    "silver", "sleepy", "slender", "smoky", "snowy", "solemn", "spare", "steady", "stormy", "sturdy", "sunny",
    "swift", "tender", "tidy", "timid", "velvet", "vivid", "wandering", "weary", "wild", "windy", "wise",
    "wooden", "young", "zealous",
)

NOUNS = (
    "anchor", "apple", "arrow", "badger", "barrel", "basket", "beacon", "beetle", "bell", "bicycle", "blanket",
    "boulder", "bridge", "bucket", "button", "cabin", "candle", "canyon", "carpet", "castle", "cellar", "cherry",
    "chimney", "cloud", "comet", "compass", "cottage", "crane", "crystal", "curtain", "desert", "dolphin",
    "drum", "eagle", "engine", "falcon", "feather", "fence", "ferry", "fiddle", "garden", "glacier", "goblet",
    "harbor", "helmet", "hermit", "island", "jacket", "kettle", "ladder", "lantern", "lemon", "library",
    "lighthouse", "meadow", "mirror", "mountain", "needle", "orchard", "otter", "paddle", "parrot", "pebble",
    "pepper", "pillow", "pine", "pocket", "pony", "puddle", "quarry", "rabbit", "raven", "ribbon", "river",
    "saddle", "sailor", "scarf", "shadow", "shovel", "spoon", "squirrel", "statue", "teapot", "thimble",
    "thunder", "tower", "tractor", "trumpet", "tunnel", "turnip", "violin", "wagon", "walnut", "whistle",
    "willow", "window",
)

# the noise haystack: plain, unrelated, repeated statements that carry nothing worth remembering
NOISE_SENTENCES = (
    "The kettle sat on the stove.", "Rain fell on the quiet road.", "A dog slept under the table.",
    "The bus came at noon.", "Leaves gathered by the gate.", "The clock on the wall ticked on.",
    "Someone left a cup on the bench.", "The river ran past the mill.", "Birds sat along the wire.",
    "The shop opened late today.", "A breeze moved the curtains.", "The path turned toward the hill.",
    "Bread cooled on the window sill.", "The lamp stayed on all night.", "Snow covered the low roofs.",
    "A boat drifted near the shore.", "The children walked home slowly.", "Dust settled on the shelf.",
    "The train was a little late.", "Grass grew between the stones.", "The wind died down by evening.",
    "A cat watched from the porch.", "The market was busy as usual.", "Clouds passed over the field.",
)

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def adjective_noun(rng: random.Random) -> str:
    """A key or value word such as 'copper-lantern'."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def uuid4(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word of five letters (consonant-vowel-consonant-vowel-consonant): all the same
    length, so no two distinct ones are substrings of each other."""
    c, v = _CONSONANTS, _VOWELS
    return rng.choice(c) + rng.choice(v) + rng.choice(c) + rng.choice(v) + rng.choice(c)


def coded_word(rng: random.Random, length: int = 6) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=length))


def variable_name(rng: random.Random, length: int = 5) -> str:
    return "".join(rng.choices(string.ascii_uppercase, k=length))


def distinct(make, rng: random.Random, count: int, exclude: set[str] = frozenset()) -> list[str]:
    """`count` distinct values of `make(rng)`, none in `exclude`."""
    out: list[str] = []
    seen = set(exclude)
    while len(out) < count:
        value = make(rng)
        if value not in seen:
            seen.add(value)
            out.append(value)
    return out
