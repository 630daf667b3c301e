"""A generated town chronicle: year after year of plain, varied events about a recurring cast, so that a
long document has long-range structure (names, trades, buildings and offices introduced early come back
much later) and its perplexity means something. Templates and word lists were written for this project."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

PREFIXES = ("Ash", "Bram", "Cold", "Elder", "Fern", "Gull", "Hollow", "Kings", "Lark", "Marsh", "North", "Oak",
            "Raven", "Salt", "Stone", "Thorn", "West", "Willow", "Brook", "Heath")
SUFFIXES = ("ford", "mere", "wick", "by", "ton", "holm", "stead", "bridge", "field", "haven", "combe", "worth")
GIVEN = {
    "she": ("Alys", "Bette", "Cora", "Dora", "Edith", "Greta", "Hana", "Ida", "Joan", "Lena", "Mabel", "Nell",
            "Orla", "Pia", "Rosa", "Sabine", "Tilde", "Una", "Vera", "Wren", "Agnes", "Clara", "Elsie", "Maud"),
    "he": ("Aldo", "Bram", "Cyril", "Dunstan", "Edmund", "Felix", "Gideon", "Hugo", "Ivo", "Jasper", "Konrad",
           "Lucan", "Milo", "Nils", "Oswin", "Piers", "Roland", "Silas", "Tobin", "Ulric", "Walter", "Osric",
           "Bertil", "Ansel"),
}
TRADES = ("miller", "smith", "weaver", "baker", "carpenter", "fisher", "potter", "brewer", "mason", "tanner",
          "shepherd", "cooper", "chandler", "glazier", "ferryman", "thatcher", "dyer", "saddler")
GOODS = ("wool", "salt", "barley", "timber", "cheese", "iron nails", "linen", "honey", "dried fish", "candles",
         "leather", "rope", "apples", "slate", "dyed cloth")
STRUCTURES = ("mill", "bridge", "granary", "chapel", "well", "bakehouse", "watchtower", "ferry landing",
              "schoolhouse", "town hall", "stone wall", "inn", "smithy", "market cross")
PLACES = ("the river bank", "the north road", "the lower market", "the old quarry", "the church green",
          "the east meadow", "the harbour steps", "Fern Lane", "the hill farms", "the mill pond")
SEASONS = ("spring", "summer", "autumn", "winter")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
OFFICES = ("reeve", "bailiff", "keeper of the weights", "warden of the bridge", "clerk of the council")
DISASTERS = ("flood", "fire", "storm", "fever", "hard frost", "drought")
QUALITIES = ("poor", "fair", "good", "plentiful", "the best in living memory", "thin and late")
CROPS = ("barley", "oats", "rye", "wheat", "beans", "turnips")
FESTIVALS = ("midsummer fair", "harvest supper", "spring market", "lantern night", "winter feast")
CONTESTS = ("the best loaf", "the heaviest ram", "the fastest boat", "the finest cloth", "archery",
            "the tallest sunflower")
FATES = ("still stands", "was mended that year", "was pulled down to make room for a road",
         "needed a new roof", "was struck by lightning but not lost", "was widened by the council")
LEGACIES = ("left a workshop to an apprentice", "was buried on the church green", "was mourned by the whole street",
            "left debts that took years to settle", "gave money for a new bell", "left a garden that still bears fruit")


@dataclass
class Person:
    given: str
    family: str
    pronoun: str
    trade: str
    home: str
    born: int

    @property
    def name(self) -> str:
        return f"{self.given} {self.family}"


@dataclass
class Chronicle:
    rng: random.Random
    year: int = 0
    town: str = ""
    people: list[Person] = field(default_factory=list)
    families: list[str] = field(default_factory=list)
    built: list[tuple[str, str, int]] = field(default_factory=list)  # (structure, builder, year)
    disasters: list[tuple[str, str, int]] = field(default_factory=list)  # (disaster, place, year)
    offices: dict[str, str] = field(default_factory=dict)
    couples: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        r = self.rng
        self.year = r.randint(1150, 1650)
        self.town = r.choice(PREFIXES) + r.choice(SUFFIXES)
        endings = ("well", "ward", "wright", "man", "wood", "ley", "dale", "cote", "more", "hurst")
        # dict, not set: a set's order changes with the process's hash seed
        self.families = list(dict.fromkeys(r.choice(PREFIXES) + r.choice(endings) for _ in range(14)))
        self.people = [self.newcomer() for _ in range(12)]

    def newcomer(self) -> Person:
        r = self.rng
        pronoun = r.choice(("she", "he"))
        return Person(r.choice(GIVEN[pronoun]), r.choice(self.families), pronoun, r.choice(TRADES), r.choice(PLACES),
                      self.year - r.randint(16, 50))

    def title(self) -> str:
        return f"The Chronicle of {self.town}\n\n"

    def paragraph(self) -> str:
        """One year of the chronicle."""
        r = self.rng
        self.year += r.choice((1, 1, 1, 2, 3))
        events = [self.event() for _ in range(r.randint(3, 6))]
        opening = r.choice((f"The year {self.year} began quietly.", f"Of the year {self.year} the record says this.",
                            f"Here follows the year {self.year}.", f"The clerk set down these things in {self.year}.",
                            f"{self.year} was a busy year in {self.town}."))
        return f"{opening} " + " ".join(events) + "\n\n"

    def event(self) -> str:
        kinds = [self.harvest, self.building, self.marriage, self.dispute, self.journey, self.council,
                 self.festival, self.disaster, self.death, self.arrival, self.trade_note]
        if self.built:
            kinds.append(self.recall_building)
        if self.disasters:
            kinds.append(self.recall_disaster)
        if self.couples:
            kinds.append(self.birth)
        return self.rng.choice(kinds)()

    # ---------------------------------------------------------------- events

    def someone(self, besides: Person | None = None) -> Person:
        return self.rng.choice([p for p in self.people if p is not besides] or self.people)

    def harvest(self) -> str:
        r = self.rng
        return (f"The {r.choice(CROPS)} harvest was {r.choice(QUALITIES)}, and a bushel sold for "
                f"{r.randint(3, 40)} pennies at {r.choice(PLACES)}.")

    def building(self) -> str:
        r, p = self.rng, self.someone()
        structure = r.choice(STRUCTURES)
        self.built.append((structure, p.name, self.year))
        return (f"{p.name} the {p.trade} built a new {structure} near {r.choice(PLACES)}, paid for by "
                f"{r.choice(('the council', 'the guild', 'a collection at the church', 'the town chest'))}.")

    def recall_building(self) -> str:
        structure, builder, year = self.rng.choice(self.built)
        return f"The {structure} that {builder} had built in {year} {self.rng.choice(FATES)}."

    def marriage(self) -> str:
        a = self.someone()
        b = self.someone(a)
        self.couples.append((a.name, b.name))
        return (f"{a.name} married {b.name} on the church green, and the {a.trade}s of the town kept the day "
                f"as a holiday.")

    def birth(self) -> str:
        r = self.rng
        a, b = r.choice(self.couples)
        pronoun = r.choice(("she", "he"))
        child = Person(r.choice(GIVEN[pronoun]), a.split()[-1], pronoun, r.choice(TRADES), r.choice(PLACES), self.year)
        if r.random() < 0.3:
            self.people.append(child)
        kind = "daughter" if pronoun == "she" else "son"
        return f"A {kind}, {child.given}, was born to {a} and {b}."

    def dispute(self) -> str:
        r = self.rng
        a = self.someone()
        b = self.someone(a)
        winner, loser = (a, b) if r.random() < 0.5 else (b, a)
        reeve = self.offices.get("reeve")
        judge = f"the reeve, {reeve}," if reeve else "the council"
        cause = r.choice(("a boundary stone", "a debt", "a strayed cow", "water rights", "a broken cart"))
        return (f"{a.name} and {b.name} quarrelled over {cause}; {judge} found for {winner.name}, and {loser.name} "
                f"paid {r.randint(2, 30)} shillings.")

    def journey(self) -> str:
        r, p = self.rng, self.someone()
        far = r.choice(PREFIXES) + r.choice(SUFFIXES)
        news = r.choice(("a new lord", "high prices", "a war in the south", "a wedding", "sickness on the roads"))
        return (f"{p.name} took {r.choice(GOODS)} to {far} and came back after {r.randint(2, 9)} weeks with "
                f"{r.choice(GOODS)} and news of {news}.")

    def council(self) -> str:
        r, p = self.rng, self.someone()
        office = r.choice(OFFICES)
        before = self.offices.get(office)
        self.offices[office] = p.name
        after = f", in place of {before}" if before and before != p.name else ""
        return f"The council chose {p.name} as {office}{after}."

    def festival(self) -> str:
        r, p = self.rng, self.someone()
        return f"At the {r.choice(FESTIVALS)} the prize for {r.choice(CONTESTS)} went to {p.name} of {p.home}."

    def disaster(self) -> str:
        r, p = self.rng, self.someone()
        kind, place = r.choice(DISASTERS), r.choice(PLACES)
        self.disasters.append((kind, place, self.year))
        return (f"In {r.choice(MONTHS)} a {kind} struck {place}; {r.randint(2, 40)} households suffered, and "
                f"{p.name} led the work of setting things right.")

    def recall_disaster(self) -> str:
        kind, place, year = self.rng.choice(self.disasters)
        return f"Old people still spoke of the {kind} of {year} and what it did to {place}."

    def death(self) -> str:
        r = self.rng
        if len(self.people) <= 6:
            return self.arrival()
        p = self.someone()
        self.people.remove(p)
        self.couples = [c for c in self.couples if p.name not in c]
        return (f"{p.name}, the {p.trade}, died in the {r.choice(SEASONS)} aged {max(self.year - p.born, 18)}; "
                f"{p.pronoun} {r.choice(LEGACIES)}.")

    def arrival(self) -> str:
        r = self.rng
        p = self.newcomer()
        self.people.append(p)
        return (f"{p.name} came from {r.choice(PREFIXES) + r.choice(SUFFIXES)} and set up as a {p.trade} "
                f"by {p.home}.")

    def trade_note(self) -> str:
        r, p = self.rng, self.someone()
        took = r.choice(("an apprentice", "two apprentices", "a partner", "a new workshop"))
        where = r.choice(("as far as the coast", "to the abbey", "at every market", "to travellers on the north road"))
        return f"{p.name} the {p.trade} took on {took}, and {p.pronoun} sold {r.choice(GOODS)} {where}."
